# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs, fine-tunes a tiny VLM on the bundled OCR set on the CPU
#   make test   -> creates .venv, installs, runs the CPU test-suite (what .ci/run calls)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	# torch/torchvision first: pinned to the builds on this machine's disk (pip cap), so nothing big downloads.
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vlm-lightning fit --config recipes/demo/ocr_cpu.yaml

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not cuda" --timeout=900 tests

clean:
	rm -rf $(VENV) runs lightning_logs
