"""Where this process stands in a launch, from the launcher's environment (deepspeed, torchrun and accelerate
all set WORLD_SIZE and RANK); no torch import, so the CLI can ask before anything heavy loads."""
import os


def world_size() -> int:
    """Ranks started by the launcher; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
