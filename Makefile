# One venv from the repo's own files, then every command runs inside it; or your own
# environment: `make train PY=python3` (any Python with torch and the project's dependencies)
# runs the targets with it and builds no venv. TORCH_INDEX: PyTorch's wheel index for your
# driver's CUDA (e.g. https://download.pytorch.org/whl/cu126): `make venv` takes torch and
# torchvision from there, at requirements.txt's versions (docs/gpu.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_INDEX ?=
# What a target that runs PY needs first: the venv, unless PY was given on the command line.
VENV_DEP := $(if $(filter command line,$(origin PY)),,venv)

# Run knobs (README.md#make-variables).
GPUS ?=
MODE ?=
RESTARTS ?= 0
CONFIG ?= configs/default.yaml
ARGS ?=
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?=
PYTEST_ARGS ?=
TEST_JOBS ?= 2
RUN ?=
RUN2 ?=
RUN3 ?=
OUT ?=
CHECKPOINT ?=
WORKERS ?= 1

LAUNCH_FLAGS = $(if $(MODE),--mode $(MODE)) --max-restarts $(RESTARTS) $(if $(GPUS),--gpus $(GPUS)) --nnodes $(NNODES) --node-rank $(NODE_RANK) \
	$(if $(MASTER_ADDR),--master-addr $(MASTER_ADDR)) $(if $(MASTER_PORT),--master-port $(MASTER_PORT))

.PHONY: venv lock train test test-fast test-torch211 docs compare bench peers ray plot doctor convert eval export bench-overhead bench-memory gpu-check lint clean

venv: $(VENV)/.installed

# Without TORCH_INDEX, requirements.lock first (tools/locked_install.py: on the machine it was
# written for, two pip processes side by side); then requirements.txt, which installs whatever
# is still missing (everything, on another machine) and takes 2 s when nothing is.
$(VENV)/.installed: requirements.txt requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install --quiet --quiet --index-url $(TORCH_INDEX) \
		$$(grep -E '^torch(vision)?==' requirements.txt),$(PYTHON) -m tools.locked_install $(VENV))
	$(VENV)/bin/pip install --quiet --quiet -r requirements.txt
	touch $@

# make lock: requirements.lock from a fresh venv of requirements.txt (after changing a pin).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --quiet -r requirements.txt
	$(PYTHON) -m tools.locked_install --write .venv-lock
	rm -rf .venv-lock

# Ctrl-C in a terminal reaches make too: it waits for the launcher's checkpoint, then ends by
# the same signal (the shell's $? is 130). A signal to the launcher alone returns make's own 2
# ("Error 130" in its message): make has no way to pass another code on.
train: $(VENV_DEP)
	$(PY) -m launch $(LAUNCH_FLAGS) $(CONFIG) $(ARGS)

# make test: both tiers (tests/unit, then the real multi-process runs); make test-fast: the
# unit tier alone (pure logic in one process, under 2 minutes).
test: $(VENV_DEP)
	$(PY) -m tests.suite --jobs $(TEST_JOBS) $(PYTEST_ARGS)

test-fast: $(VENV_DEP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# make docs: the config reference in docs/configuration.md, generated from common/schema*.py.
docs: $(VENV_DEP)
	$(PY) -m tools.config_reference

# The second tier: the GPU machine's stack (torch 2.11.0, torchvision 0.26.0, Python 3.12, no
# wandb), the oldest torch pyproject.toml supports, in its own venv from
# requirements-torch211.txt; it runs the tests marked `compat` (every path and mode, resume,
# the loaders, the launcher, gpu-check's CPU part). PIP_CONSTRAINT= : a machine-wide pip
# constraints file must not decide which torch this tier tests. PYTHON312: the first
# python3.12 that runs (a pyenv shim may exist without selecting 3.12).
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c '' 2>/dev/null && { echo $$p; break; }; done)
VENV211 ?= .venv-torch211

# Then the project itself, as a user with their own torch installs it (`pip install -e .`):
# pyproject.toml's ranges must keep the venv's torch 2.11.0 and torchvision 0.26.0, checked
# against requirements-torch211.txt's pins.
STACK_KEPT = import re, sys, torch, torchvision; \
	pins = dict(re.findall(r"^(torch|torchvision)==(\S+)", open("requirements-torch211.txt").read(), re.M)); \
	got = {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0]}; \
	sys.exit(None if got == pins else f"make test-torch211: pip install -e . changed the stack to {got}, requirements-torch211.txt pins {pins}")

$(VENV211)/.installed: requirements-torch211.txt pyproject.toml
	@test -n "$(PYTHON312)" || { echo "make test-torch211: no python3.12 found (give PYTHON312=...)"; exit 2; }
	$(PYTHON312) -m venv $(VENV211)
	PIP_CONSTRAINT= $(VENV211)/bin/pip install --quiet --quiet -r requirements-torch211.txt
	PIP_CONSTRAINT= $(VENV211)/bin/pip install --quiet --quiet -e .
	$(VENV211)/bin/python -c '$(STACK_KEPT)'
	touch $@

test-torch211: $(VENV211)/.installed
	@! $(VENV211)/bin/python -c "import wandb" 2>/dev/null || { echo "make test-torch211: wandb is installed in $(VENV211); the tier proves the code runs without it"; exit 2; }
	$(VENV211)/bin/python -m pytest -m compat $(PYTEST_ARGS)

# make compare [ARGS="--workers 1,2 --epochs 3"]: ddp, scratch (ring, naive) and dp side by side,
# into reports/compare.
compare: $(VENV_DEP)
	$(PY) -m tools.compare $(ARGS)

# make plot RUN=runs/a [RUN2=runs/b RUN3=runs/c] [OUT=folder]: PNGs of one or several runs.
plot: $(VENV_DEP)
	$(PY) -m tools.plot $(RUN) $(RUN2) $(RUN3) $(if $(OUT),--out $(OUT))

# make convert RUN=runs/a [OUT=file]: a sharded (mode fsdp) checkpoint as one plain file.
convert: $(VENV_DEP)
	$(PY) -m tools.convert_checkpoint $(RUN) $(if $(OUT),--out $(OUT))

# make eval RUN=runs/x [CHECKPOINT=last|best|file] [WORKERS=2] [ARGS="--ema data.root=..."]: eval.json and
# confusion.png in the run folder.
eval: $(VENV_DEP)
	$(PY) -m train.after.evaluate $(RUN) --workers $(WORKERS) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(ARGS)

# make export RUN=runs/x [CHECKPOINT=last|best|file] [OUT=folder] [ARGS=--ema]: model.pt, model.pt2, meta.json.
export: $(VENV_DEP)
	$(PY) -m train.after.export $(RUN) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) $(if $(OUT),--out $(OUT)) $(ARGS)

# make doctor [GPUS=.. CONFIG=.. ARGS=.. NNODES=.. ...]: what would go wrong, before launching.
doctor: $(VENV_DEP)
	$(PY) -m launch.doctor $(LAUNCH_FLAGS) $(CONFIG) $(ARGS)

# make bench [ARGS="--only data"]: scaling, allreduce bandwidth, overlap, data, overhead, peers -> reports/bench.
bench: $(VENV_DEP)
	$(PY) -m tools.bench $(ARGS)

# The optional peers `make bench` compares against (PyTorch Lightning, HF Accelerate).
peers: venv
	$(VENV)/bin/pip install --quiet --quiet -r requirements-peers.txt

# Ray Train, the optional engine (python -m launch.ray, docs/ray.md); .ci/run installs it.
ray: venv
	$(VENV)/bin/pip install --quiet --quiet -r requirements-ray.txt

bench-overhead: $(VENV_DEP)
	$(PY) -m tools.bench.overhead $(ARGS)

# make gpu-check [PY=python3] [ARGS="--budget-s 330"]: the GPU path on a lent GPU machine (one
# GPU, under 6 minutes), with that machine's own python (no venv, nothing downloaded) ->
# reports/gpu-check/report.md. ARGS=--cpu-dry-run: every part's CPU form, no GPU needed.
gpu-check: PY = python3
gpu-check:
	$(PY) -m tools.gpu_check $(ARGS)

bench-memory: $(VENV_DEP)
	$(PY) -m tools.bench.memory $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VENV211) .venv-lock .pytest_cache .ruff_cache
