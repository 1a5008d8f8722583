"""Model families (one adapter each) and model loading (the embedded default, local directories, hub ids)."""
from ds_spd.models.adapters import ADAPTERS, ModelAdapter, adapter_for  # noqa: F401
from ds_spd.models.loading import load_model, load_model_config, resolve_model_path  # noqa: F401
