import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import EVEN, KV1, save_tiny  # noqa: E402  (tests/support: setup.cfg pythonpath)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA (6 q / 3 KV heads: uneven at tp 2) saved as an HF directory."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_even_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny_llama_even")), **EVEN)


@pytest.fixture(scope="session")
def kv1_dir(tmp_path_factory):
    """A tiny random LLaMA with one KV head and 4 query heads (tp 2 and 4 replicate the KV head)."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny_llama_kv1")), **KV1)


#: The test files that take longest (wall seconds summed over their tests in one `make test`, DS_SPD_TEST_CPU
#: below; 2026-12-03), longest first. pytest-xdist's ``--dist loadfile`` hands out files in collection order when
#: told not to reorder them by test count (``--no-loadscope-reorder``, in the Makefile), so these go first and the
#: short ones fill in at the end (longest-first scheduling): a long file handed out last kept one worker busy
#: after the others had finished. Only an order: a file missing here runs after them.
LONGEST_FIRST = ("serve/test_serve.py", "cli/test_safety.py", "stages/test_distill.py", "cli/test_multinode.py",
                 "serve/test_faults.py",
                 "stages/test_recipe.py", "stages/test_readme_path_gemma.py", "stages/test_readme_path.py",
                 "stages/test_planner.py", "core/test_multirank.py", "cli/test_cli_ranks.py",
                 "models/test_real_model.py", "tools/test_lm_eval.py", "stages/test_scan.py",
                 "stages/test_layerwise.py", "models/test_sharded_load.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0].removeprefix("tests/")
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)   # stable: a file's tests keep their order


# DS_SPD_TEST_CPU=FILE: per test, the CPU seconds of this process and of the processes it waited for (launchers
# and their ranks included), appended as JSON lines: a cost that, unlike wall time, does not depend on what ran
# beside the test (docs/testing.md).
if os.environ.get("DS_SPD_TEST_CPU"):
    import json
    import resource
    import time

    def _cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        cpu, wall, started = _cpu(), time.monotonic(), time.time()
        yield
        with open(os.environ["DS_SPD_TEST_CPU"], "a") as f:   # start and worker: where the suite's wall time went
            f.write(json.dumps({"test": item.nodeid, "cpu": round(_cpu() - cpu, 2),
                                "wall": round(time.monotonic() - wall, 2), "start": round(started, 2),
                                "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}) + "\n")
