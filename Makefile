# sdserve: `make test` and `make serve` set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Two processes sharing two cores: passive OpenMP waits stop them spinning against each other.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup test test-all lint serve bench protos clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone, so that no later resolver pulls another build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,onnx]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check sdserve tests bench
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check sdserve tests bench

serve: $(STAMP)
	$(VENV)/bin/sdserve serve --model default --host 127.0.0.1 --port 50051

# The short default of the whole suite (<= 10 min on 2 CPU cores): kernels, engine batching, and
# the load suite (sdserve vs the diffusers and homogeneous-batching baselines, 32 adapters).
bench: $(STAMP)
	$(PY) -m bench.kernels --quick
	$(PY) -m bench.engine_batching --quick
	$(PY) -m bench.load --suite quick

protos: $(STAMP)
	$(PY) -m sdserve.protos.generate

clean:
	rm -rf $(VENV) .pytest_cache
