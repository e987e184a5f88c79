"""A grid search whose pick is bracketed: the best value must have a worse one on each side.

A pick at the edge of its grid says only that the optimum lies beyond it. The search below
tries the grid, then, while the best value sits at an edge, one more value past that edge (the
next value of the 1-3 ladder, or the edge's ratio to its neighbour applied once more), up to ``extensions`` times. A run that
diverges scores as the worst possible, so divergence brackets a rate from above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class BracketedSearch:
    best: float
    trials: list[tuple[float, float]]  # (value, score) in the order tried; higher scores win
    interior: bool  # a value on each side of ``best`` was tried and scored worse


LADDER = (1.0, 3.0)  # the usual half-decade grid: 1e-3, 3e-3, 1e-2, ...


def _rung(value: float) -> int | None:
    """The index of ``value`` on the 1-3 ladder (..., 1e-3 -> -6, 3e-3 -> -5, ...), if on it."""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = value / 10**exponent
    for index, step in enumerate(LADDER):
        if math.isclose(mantissa, step, rel_tol=1e-6):
            return 2 * exponent + index
    return None


def _beyond(edge: float, neighbour: float) -> float:
    """One step past ``edge``, away from ``neighbour``: on the 1-3 ladder if both are on it."""
    edge_rung, neighbour_rung = _rung(edge), _rung(neighbour)
    if edge_rung is not None and neighbour_rung is not None:
        rung = edge_rung + (1 if edge_rung > neighbour_rung else -1)
        return float(f"{LADDER[rung % 2] * 10.0 ** (rung // 2):.3g}")
    return float(f"{edge * edge / neighbour:.3g}")


def bracketed_search(
    score: Callable[[float], float], grid: Sequence[float], extensions: int = 2
) -> BracketedSearch:
    """Score every value of ``grid``; extend past an edge best up to ``extensions`` times."""
    if not grid or any(value <= 0 for value in grid):
        raise ValueError(f"the grid must hold positive values, got {list(grid)}")
    scores: dict[float, float] = {}
    trials: list[tuple[float, float]] = []

    def tried(value: float) -> None:
        scores[value] = score(value)
        trials.append((value, scores[value]))

    for value in sorted(set(grid)):
        tried(value)
    for _ in range(extensions):
        ordered = sorted(scores)
        best = max(ordered, key=scores.__getitem__)
        if len(ordered) < 2 or ordered[0] < best < ordered[-1]:
            break
        neighbour = ordered[1] if best == ordered[0] else ordered[-2]
        tried(_beyond(best, neighbour))
    ordered = sorted(scores)
    best = max(ordered, key=scores.__getitem__)
    return BracketedSearch(best, trials, ordered[0] < best < ordered[-1])
