"""The one place where ds_spd communicates: reducers for the SPD block, and their accounting.

A reducer turns the stacked per-shard partial sums ``[S, ..., d]`` of a row-parallel layer into
the full sum. Real TP holds one shard per rank and all-reduces it over the TP group; virtual TP holds
all N shards in one process and sums them. Both count their calls, so the all-reduce count per
forward is the same number in both modes.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from ds_spd.choices import COMM_PATHS
from ds_spd.errors import LaunchError
from ds_spd.ports import free_port, port_in_use
from ds_spd.ranks import same_build_tools, world_size

#: dtypes DeepSpeed's shared-memory inference all-reduce handles; it silently skips others.
_SHM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class CommStats:
    """All-reduce calls, elements and wall time since the last ``reset``."""

    calls: int = 0
    elements: int = 0
    seconds: float = 0.0
    forwards: int = 0
    timed: bool = True
    _by_kind: dict = field(default_factory=dict)
    _seconds_by_kind: dict = field(default_factory=dict)

    def reset(self) -> None:
        self.calls, self.elements, self.seconds, self.forwards = 0, 0, 0.0, 0
        self._by_kind.clear()
        self._seconds_by_kind.clear()

    def record(self, kind: str, numel: int, seconds: float = 0.0) -> None:
        self.calls += 1
        self.elements += numel
        self.seconds += seconds
        self._by_kind[kind] = self._by_kind.get(kind, 0) + 1
        self._seconds_by_kind[kind] = self._seconds_by_kind.get(kind, 0.0) + seconds

    def summary(self) -> dict:
        per = max(self.forwards, 1)
        return {"allreduce_per_forward": self.calls / per, "allreduce_seconds_per_forward": self.seconds / per,
                "allreduce_by_kind_per_forward": {k: v / per for k, v in sorted(self._by_kind.items())},
                "allreduce_seconds_by_kind_per_forward": {k: v / per for k, v in sorted(self._seconds_by_kind.items())},
                "forwards": self.forwards}


class VirtualReduce:
    """Virtual TP: all shards live in this process; the all-reduce is a sum over the shard axis."""

    def __init__(self, stats: CommStats):
        self.stats = stats

    def __call__(self, partials: torch.Tensor, kind: str) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.stats.record(kind, partials[0].numel())
        return partials.sum(0)


class AllReduce:
    """Real TP: this rank's one shard, summed over the TP group.

    ``path="auto"`` takes DeepSpeed's inference all-reduce (its shared-memory op on CPU under the
    deepspeed launcher, NCCL on CUDA) where that op is correct: the group is the whole world (the shm op
    ignores ``group``) and the dtype is one it reduces. Otherwise, or with ``path="gloo"``, it uses
    ``torch.distributed.all_reduce`` on the group.
    """

    def __init__(self, group, stats: CommStats, path: str = "auto"):
        if path not in COMM_PATHS:
            raise ValueError(f"comm path must be one of {COMM_PATHS}, got {path!r}")
        self.group, self.stats, self.path = group, stats, path
        self._group_is_world = torch_dist.get_world_size(group) == torch_dist.get_world_size()
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def __call__(self, partials: torch.Tensor, kind: str) -> torch.Tensor:
        assert partials.shape[0] == 1, "real TP holds exactly one shard per rank"
        if torch.compiler.is_compiling():   # inside a compiled step: the op itself, traced (no timer, no count)
            return self._reduce(partials[0].contiguous())
        if self.stats.timed:   # the whole reduce is timed: everything a dropped sync removes (copy, call, sync)
            self._sync()
        start = time.perf_counter()
        tensor = self._reduce(partials[0].contiguous())
        if self.stats.timed:
            self._sync()
        self.stats.record(kind, tensor.numel(), time.perf_counter() - start)
        return tensor

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over the group, on the chosen path. Inside a compiled step DeepSpeed's
        shared-memory all-reduce is called as the torch op it registers (traced, no graph break); gloo goes through
        torch.distributed, which dynamo maps to functional collectives."""
        if self.path == "auto" and self._group_is_world and tensor.dtype in _SHM_DTYPES:
            if torch.compiler.is_compiling():
                torch.ops.deepspeed.inference_all_reduce_(tensor)
            else:
                import deepspeed.comm as ds_comm
                ds_comm.inference_all_reduce(tensor, group=self.group)
        else:
            torch_dist.all_reduce(tensor, group=self.group)
        return tensor


def backend() -> str:
    """torch.distributed backend for this machine: NCCL with CUDA, gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def all_ranks_local() -> bool:
    """Whether every rank runs on this host (the launcher's LOCAL_SIZE / LOCAL_WORLD_SIZE covers the world)."""
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    return local is None or int(local) >= world_size()


def init_comm() -> None:
    """DeepSpeed's distributed init, then the one switch ds_spd makes in DeepSpeed's communication.

    DeepSpeed's CPU ``inference_all_reduce`` (called by AutoTP's own ``LinearAllreduce`` and by ds_spd's
    ``comm: auto``) runs its shared-memory kernel whenever the op is built, but that kernel only initialises
    its buffers when all ranks share one host (LOCAL_SIZE == world size); across hosts it reads unmapped
    buffers and the rank dies with SIGSEGV at the first forward. Its backend falls back to
    ``torch.distributed.all_reduce`` when ``shm_vector_kernel_level`` is 0, so across hosts ds_spd sets that
    to 0: every all-reduce, AutoTP's and ours, then goes over gloo (NCCL on CUDA is untouched: no shm op).
    The shm buffers' names are unlinked here too, right after DeepSpeed created and mapped them.
    """
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    prepare_dist_env()
    deepspeed.init_distributed(dist_backend=backend())   # maps every rank's shm buffer (once per process)
    if not torch.cuda.is_available() and not all_ranks_local() and ds_comm.cdb is not None:
        ds_comm.cdb.shm_vector_kernel_level = 0
    release_shm_buffer()


def finish_comm(destroy: bool = True) -> bool:
    """Leave together at the end of a command (a rank exiting while another still writes, rank 0 saving the
    checkpoint, aborted in gloo's thread teardown: "terminate called without an active exception"), and shut the
    process group down (``destroy``). DeepSpeed's cached clone of the world group dies with the group, so it is
    dropped too: a later engine in the same process (a test worker, a notebook) would broadcast over the dead
    clone ("Group ... is not registered"). True if this process was in a group of several ranks."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return False
    several = torch_dist.get_world_size() > 1
    torch_dist.barrier()
    if destroy or not several:
        torch_dist.destroy_process_group()
        groups = sys.modules.get("deepspeed.utils.groups")
        if groups is not None:
            groups._WORLD_GROUP = None
    return several


def shm_buffer_path() -> str:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for this rank (deepspeed/ops/csrc/cpu/comm/shm.cpp:
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, ~66 MB, never removed by DeepSpeed)."""
    env = os.environ
    return os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
                                    f"{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}")


_SHM: dict[str, bool] = {}   # this rank's buffer path -> whether this process created it


def remove_shm_buffer_at_exit() -> None:
    """Remove this rank's shm all-reduce buffer when the process exits (normally, on an error, or on SIGTERM
    via the CLI's handler): one-process runs pick a fresh MASTER_PORT, so the 66 MB files piled up in RAM."""
    import atexit
    path = shm_buffer_path()
    if path in _SHM:
        return
    _SHM[path] = not os.path.exists(path)  # a file this process did not create is left alone
    atexit.register(lambda: _SHM[path] and os.path.exists(path) and os.unlink(path))


def release_shm_buffer() -> None:
    """Unlink this rank's shm buffer *name* once every rank has mapped every buffer (DeepSpeed maps them all in
    its distributed init, once per process): the memory stays mapped for the run and is freed with the
    processes, even after a SIGKILL, and nothing is left in /dev/shm. Every rank of a CPU run calls it."""
    path = shm_buffer_path()
    if path not in _SHM:
        return
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()   # every rank has returned from init, so every buffer is mapped
    if _SHM[path] and os.path.exists(path):
        os.unlink(path)


def prepare_dist_env() -> None:
    """Environment DeepSpeed's distributed init needs, for any launcher (or none)."""
    same_build_tools()
    # torchrun / accelerate set LOCAL_WORLD_SIZE but not LOCAL_SIZE, which DeepSpeed's CPU shared-memory
    # all-reduce reads; without it AutoTP inference crashed (SIGSEGV).
    if "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
        os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    if world_size() == 1:  # a single process started without a launcher
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
    elif _hosts_the_store() and port_in_use(int(os.environ["MASTER_PORT"])):
        raise LaunchError(f"master port {os.environ['MASTER_PORT']} is in use on this host (another launch?): "
                          "pass --master_port N to the deepspeed launcher, or start with launch/tp.sh (it picks a "
                          "free one)")
    if not torch.cuda.is_available():
        remove_shm_buffer_at_exit()


def _hosts_the_store() -> bool:
    """Whether this process is about to bind the rendezvous store on MASTER_PORT (rank 0 under the deepspeed
    launcher, before init; under torchrun or accelerate the agent already holds it)."""
    return (os.environ.get("RANK") == "0" and "TORCHELASTIC_RUN_ID" not in os.environ
            and os.environ.get("MASTER_PORT", "").isdigit() and not torch_dist.is_initialized()
            and os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"))
