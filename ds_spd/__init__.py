"""ds_spd: Sync-Point Drop (Kim et al., ICML 2025) for tensor-parallel LLM inference on DeepSpeed."""
from .block import SPDDecoderLayer
from .comm import CommStats
from .config import SPDConfig, resolve_spd_config
from .errors import ConfigError, LaunchError, LayoutError, PlanError, SPDInputError
from .inject import get_spd_blocks, init_inference, set_spd_blocks, virtualize
from .layout import TPLayout
from .plan import Plan, load_plan

__version__ = "0.1.0"

__all__ = ["SPDDecoderLayer", "CommStats", "ConfigError", "SPDConfig", "resolve_spd_config", "init_inference",
           "virtualize", "set_spd_blocks", "get_spd_blocks", "LayoutError", "TPLayout", "Plan", "PlanError", "LaunchError", "SPDInputError",
           "load_plan", "__version__"]
