# retro-transfer: `make demo` runs the main job, `make test` the test suite.
# Both set up .venv first (once: the second `make setup` is a no-op).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The tested pair; they install from local files on the project's machines.
# Bring your own build with `make setup TORCH=` (empty: keep what is installed).
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/demo
STAMP := $(VENV)/.retro-transfer-setup
SETUP_INPUTS := Makefile setup.py tools/install_detectron2.py retro_transfer/compat/mmcv_ops.py retro_transfer/compat/__main__.py

.PHONY: help setup demo test clean-demo
.DEFAULT_GOAL := help

help:
	@echo "make setup   create $(VENV) and install everything (torch, timm, Detectron2, MMSeg, MMDetection)"
	@echo "make demo    the main job: shapes data -> teacher -> 4 distilled students -> detection and segmentation -> $(DEMO_OUT)/report.md"
	@echo "make test    the test suite (CPU)"

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "setuptools<81" wheel
	$(if $(strip $(TORCH)),$(PIP) install -q $(TORCH))
	$(PIP) install -q -e ".[all]"
	$(PY) tools/install_detectron2.py
	$(PY) -m retro_transfer.compat --install-pth
	$(PY) -c "import detectron2, mmseg.models, mmdet.models, retro_transfer, distill" 2>/dev/null \
		|| { echo "set-up finished but the core imports fail; run: $(PY) -c 'import detectron2, mmseg.models, mmdet.models'"; exit 1; }
	@touch $@
	@echo "set-up complete: $(VENV)"

demo: setup
	$(PY) tools/pipeline.py --preset default --out $(DEMO_OUT)
	@echo "report: $(DEMO_OUT)/report.md"

test: setup
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO_OUT)
