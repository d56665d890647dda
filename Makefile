# make demo | make test | make bench — each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel; a plain `torch` requirement would pull CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,hf,remote,tvm]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgeplan compile examples/gpt.py:build --fleet home-lab -o out/gpt
	$(BIN)/python examples/demo.py out/gpt

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/partition.py
	$(BIN)/python bench/compress.py
	$(BIN)/python bench/remote.py
	$(BIN)/python bench/predictor.py
	$(BIN)/python bench/plan_quality.py
	$(BIN)/python bench/unseen_device.py
	$(BIN)/python bench/unseen_backend.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/targets.py --trials 16
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf out $(VENV)
