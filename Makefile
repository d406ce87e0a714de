# The whole set-up lives here: a fresh machine (offline, package registries only) needs nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU torch wheel on these machines; a free choice would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data main test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed data

# Fashion-MNIST from Debian's package (MIT). Needs root; elsewhere the loader says how to get it.
data:
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	    echo "warning: could not install dataset-fashion-mnist; the Fashion-MNIST run will explain how to get it"; \
	  else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the built-in Fashion-MNIST data"; fi; \
	fi

# The main job: dense, Tri-Level SparseViT, dense budget-matched to it and PatchDropout at its training FLOPs, on
# Fashion-MNIST (10-20 min on 2 CPU cores); table, results.json and plots in outputs/demo.
main: setup
	$(VENV)/bin/hf-sparse demo --output_dir outputs/demo

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

bench: setup
	$(VENV)/bin/hf-sparse bench throughput

clean:
	rm -rf $(VENV) outputs .pytest_cache
