# Two commands do all set-up on a fresh machine:
#   make demo   -> creates .venv, installs, fine-tunes a tiny VLM on the bundled OCR set on the CPU, exports GGUF
#   (then, optionally, make demo-grpo -> GRPO on top of the demo's model, on a shifted OCR task)
#   make test   -> creates .venv, installs (with test extras), lints, runs the CPU test-suite (what .ci/run calls)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
TESTX := $(VENV)/.installed-test

.PHONY: demo demo-grpo test lint install clean

$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	# torch/torchvision first, at the versions the package is tested with (CPU builds are enough here)
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e .
	touch $(BASE)

# llama-cpp-python compiles llama.cpp (about 10 minutes on 2 cores the first time; pip caches the wheel).
$(TESTX): $(BASE)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install -q -e ".[test]"
	touch $(TESTX)

install: $(BASE)

# The demo is the real workflow in miniature: fit (writes runs/demo/checkpoints/last.ckpt), merge the checkpoint
# into a model folder, export GGUF + mmproj, and read validation images back through llama.cpp if installed.
demo: $(BASE)
	$(BIN)/vlm-lightning fit --config recipes/demo/ocr_cpu.yaml
	$(BIN)/vlm-lightning export merge --checkpoint runs/demo/checkpoints/last.ckpt --out runs/demo/merged
	$(BIN)/vlm-lightning export gguf --checkpoint runs/demo/merged --out runs/demo/gguf
	$(BIN)/python -m vlm_lightning.demo.ask_gguf --gguf runs/demo/gguf --val runs/demo/data/val.jsonl

# GRPO on top of the demo (after `make demo`, whose merged model it starts from): the OCR reward teaches the
# model to read the same numbers in a smaller font, on the CPU in a few minutes (recipes/demo/grpo_cpu.yaml).
demo-grpo: $(BASE)
	@test -f runs/demo/merged/config.json || { echo "runs/demo/merged is missing: run make demo first"; exit 1; }
	$(BIN)/vlm-lightning fit --config recipes/demo/grpo_cpu.yaml

lint: $(TESTX)
	$(BIN)/ruff check .

test: lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m "not cuda" --timeout=900 tests

clean:
	rm -rf $(VENV) runs lightning_logs
