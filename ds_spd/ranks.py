"""Where this process stands in a launch, from the launcher's environment (deepspeed, torchrun and accelerate
all set WORLD_SIZE and RANK), and the build tools its ranks use; no torch import, so the CLI can ask before
anything heavy loads."""
import os
import sys


def world_size() -> int:
    """Ranks started by the launcher; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def same_build_tools() -> None:
    """Put this Python environment's tools first on PATH, so every process builds DeepSpeed's shm op with the same
    ``ninja``. PyTorch builds it with whichever ``ninja`` PATH finds, into one shared cache; a venv's ninja (1.13
    here) and the system's (1.11) record commands differently in ``.ninja_log``, so processes started with and
    without the venv on PATH (``launch/tp.sh`` puts it there, ``.venv/bin/deepspeed`` does not) rebuilt the op from
    scratch at every switch: ~35 s of both cores, with the other ranks waiting on the build lock."""
    tools = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(tools, "ninja")):
        path = os.environ.get("PATH", "").split(os.pathsep)
        if path[:1] != [tools]:
            os.environ["PATH"] = os.pathsep.join([tools, *[p for p in path if p != tools]])
