"""ds_spd: Sync-Point Drop (Kim et al., ICML 2025) for tensor-parallel LLM inference on DeepSpeed.

Public names are imported on first use (PEP 562), so ``ds-spd --help`` and config validation do not load
torch or DeepSpeed.
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "SPDDecoderLayer": "core.block", "CommStats": "core.comm", "TPLayout": "core.layout",
    "init_inference": "build", "virtualize": "core.inject", "set_spd_blocks": "core.inject",
    "set_lag": "core.inject",
    "get_spd_blocks": "core.inject", "ModelAdapter": "models.adapters", "adapter_for": "models.adapters",
    "load_model": "models.loading", "SPDConfig": "config", "resolve_spd_config": "config",
    "RunSpec": "run", "resolve_run": "run", "build_runner": "build", "Plan": "plan", "load_plan": "plan",
    "ConfigError": "errors", "LaunchError": "errors", "LayoutError": "errors", "PlanError": "errors",
    "SPDInputError": "errors", "OutputError": "errors", "DataError": "errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'ds_spd' has no attribute {name!r}")
