"""ds_spd's several-row product kernel (``csrc/row_products.cpp``) as the torch op ``ds_spd::row_products``.

A decode step of several sequences multiplies 2-16 activation rows by every weight matrix. The library's
products (MKL) read the weights at half their one-row rate there; the kernel keeps a tile of weight rows in
registers while every activation row passes over it, so each weight byte comes from memory once (figures:
docs/latency.md). It is compiled on first use for this machine's vector unit (``-march=native``) with torch's
extension builder and kept in torch's extension cache (``TORCH_EXTENSIONS_DIR``): the first ``serve`` on a
machine pays some seconds, later launches load it; ranks starting together build it once (an OS lock, so a
rank killed mid-build leaves no lock behind that would stall the next start). A registered fake lets inductor
place it in a compiled graph as an external call (it does not fuse into it). Where it cannot be built (no C++
compiler), the graph keeps the library's products, with a warning.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from ds_spd.errors import brief

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "row_products.cpp")
NAME = "ds_spd_row_products"


@functools.lru_cache(maxsize=None)
def load() -> bool:
    """Build (once a machine) and load the op; False, with a warning, where it cannot be built."""
    if hasattr(torch.ops.ds_spd, "row_products"):
        return True
    try:
        from torch.utils.cpp_extension import _get_build_directory
        from torch.utils.cpp_extension import load as build

        from ds_spd.locks import waiting_lock
        where = _get_build_directory(NAME, verbose=False)
        with waiting_lock(os.path.join(where, "ds_spd")):   # an OS lock: released when its holder dies
            # torch's own lock is a plain file, which a build killed midway leaves behind, and every later build
            # would wait on it for ever; under ours no other ds_spd build is running, so such a file is stale
            stale = os.path.join(where, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            build(name=NAME, sources=[SOURCE], extra_cflags=["-O3", "-march=native"], is_python_module=False,
                  verbose=False)
    except Exception as err:   # no compiler, no headers: the library's products serve instead
        warnings.warn(f"ds_spd's several-row product kernel could not be built ({brief(err)}); the compiled "
                      "decode step keeps the library's products", stacklevel=2)
        return False

    @torch.library.register_fake("ds_spd::row_products")
    def _(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))
    return True


def row_products(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for float32 CPU rows ``x [M, K]`` and weight ``w [N, K]`` through the kernel
    (:func:`load` first)."""
    return torch.ops.ds_spd.row_products(x, w, bias)
