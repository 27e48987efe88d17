# make demo: the main job on the embedded corpus, end to end (creates .venv on first use).
# make test: the test suite (same setup). CI runs `bash .ci/run`, which calls `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo demo-results test test-fast test-wheelhouse bench clean-runs venv gpu-check memory-probe rehearsal wheelhouse

venv: $(STAMP)

# torch first, pinned: pip takes the local CPU build; a range would pull a multi-GB CUDA build. Then the dev
# list (requirements.txt: q0ds editable with its extras, pytest) at the exact CI versions of constraints.txt.
$(STAMP): requirements.txt constraints.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -r requirements.txt
	touch $(STAMP)

# Offline install for a GPU node (docs/install.md): wheels of q0ds and every dependency except torch, for the
# node's Python and platform, at the versions of constraints.txt. Needs the index (run on a connected machine).
PYTHON_VERSION ?= 3.12
PLATFORM       ?= manylinux2014_x86_64
EXTRAS         ?=
WHEELHOUSE     ?= wheelhouse
wheelhouse:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY)) tools/wheelhouse.py --out $(WHEELHOUSE) \
		--python-version $(PYTHON_VERSION) --platform $(PLATFORM) --extras "$(EXTRAS)"

demo: $(STAMP)
	$(BIN)/q0ds demo --out runs/demo

# The demo's numbers and plots as committed results (the README's demo section cites these files).
demo-results: demo
	sed 's|(plots/|(demo_|g' runs/demo/report.md > benchmarks/results/demo_report.md
	cp runs/demo/report.json benchmarks/results/demo_report.json
	for f in runs/demo/plots/*.png; do cp $$f benchmarks/results/demo_$$(basename $$f); done

# The suite minus the air-gapped install round trip (a wheelhouse download and a fresh venv: minutes of network
# and pip, nothing about q0ds' own code); .ci/run runs that right after, as `make test-wheelhouse`.
# Two pytest-xdist workers (tests/conftest.py groups the tests into per-file units, longest first): a 2-core
# machine sits half idle while one process imports torch or waits on a launcher. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder)
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not wheelhouse" $(PYTEST_ARGS)

test-wheelhouse: $(STAMP)
	$(BIN)/python -m pytest -q -m wheelhouse $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not wheelhouse" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/overheads.py
	$(BIN)/python benchmarks/prior_fit.py
	$(BIN)/python benchmarks/data_efficiency.py --honest-arms
	$(BIN)/python benchmarks/distill_retention.py
	$(BIN)/python benchmarks/de_fit3k.py

# One JSON summary of the 1.8b preset on the CUDA GPUs present (<= 8 min); fails clearly without a GPU.
# The node's own interpreter when q0ds imports there (a cluster's CUDA torch): the pinned venv only otherwise.
gpu-check:
	@if $(PY) -c "import q0ds, deepspeed" 2>/dev/null; then DS_ACCELERATOR=cuda $(PY) benchmarks/gpu_check.py; \
	else $(MAKE) venv && DS_ACCELERATOR=cuda $(BIN)/python benchmarks/gpu_check.py; fi

# CPU rehearsal of the 1.8b widths (1 layer, fp32, 2 ranks ZeRO-3, Muon, distillation, kill + relaunch):
# benchmarks/results/rehearsal.json. The tiny variant runs in `make test` (tests/test_rehearsal.py).
rehearsal: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python benchmarks/rehearsal.py --no-straight

# Re-measure the memory plan's constants (benchmarks/results/memory_probe.json; copy into q0ds/plan.py MEASURED).
memory-probe: $(STAMP)
	$(BIN)/python benchmarks/memory_probe.py

clean-runs:
	rm -rf runs
