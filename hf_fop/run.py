"""Run an unmodified Hugging Face script with ``--optim fop`` available.

python -m hf_fop.run run_image_classification.py --optim fop --optim_args damping=0.02 ...
accelerate launch -m hf_fop.run run_glue.py --optim fop ...
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    from hf_fop.integration import enable

    enable()
    script, *script_args = argv
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
