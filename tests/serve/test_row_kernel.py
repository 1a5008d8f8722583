"""ds_spd's several-row product kernel (ds_spd.serve.row_kernel): equal to the library's products on every path
through it, and built so that a build killed midway does not stall the next one."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_row_kernel_equals_the_library_products():
    """ds_spd's several-row product kernel (ds_spd.serve.row_kernel) against ``F.linear`` on shapes that reach
    every path: each chunk size of rows (1-8) and two chunks; weight rows that leave a remainder after the tiles;
    a K that is not a multiple of the vector width; a bias; rows and weights that are not contiguous."""
    import torch.nn.functional as F

    from ds_spd.serve import row_kernel
    assert row_kernel.load()
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 11, 16):
        for n, k in ((48, 64), (37, 40), (129, 23)):
            x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
            torch.testing.assert_close(row_kernel.row_products(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(row_kernel.row_products(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    x, w = torch.randn(40, 5).t(), torch.randn(40, 33).t()
    torch.testing.assert_close(row_kernel.row_products(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="float32 only"):
        row_kernel.row_products(x.double(), w.double())


def test_a_build_killed_midway_does_not_stall_the_next(tmp_path):
    """torch's extension builder waits for ever on a lock file that a killed build leaves behind; a server started
    again after its ranks were killed while building must not hang: ds_spd's build removes such a file under its own
    OS lock. Run in a fresh process (this one has the op loaded), on a fresh extension cache, with a time limit."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": ROOT}
    code = ("import os, sys; from torch.utils.cpp_extension import _get_build_directory as d; "
            "from ds_spd.serve import row_kernel as k; "
            "where = d(k.NAME, verbose=False); open(os.path.join(where, 'lock'), 'w').close(); "
            "assert k.load(); x, w = __import__('torch').randn(3, 20), __import__('torch').randn(7, 20); "
            "assert (k.row_products(x, w) - x @ w.t()).abs().max() < 1e-4; "
            "assert not os.path.exists(os.path.join(where, 'lock'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
