# Two entry points, both doing the whole set-up on a fresh machine:
#   make run    -> `weightablate run` on the embedded digits default
#   make test   -> the test suite (CPU; CUDA tests are skipped without a GPU)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.weightablate-installed
SOURCES := $(wildcard setup.py pyproject.toml csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*.h csrc/*/*.h)

.PHONY: run test bench setup clean

run: $(STAMP)
	$(VENV)/bin/weightablate run

test: $(STAMP)
	# report.html is tested in headless Chromium (Debian's package; sudo when not root)
	command -v chromium >/dev/null || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -qq && $$S apt-get install -y -qq chromium; }
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-columns=min,median,max,rounds
	# the fused whole-layer kernel: AlexNet FC2 rows x 2,048 samples, extrapolated; digits vs the naive loop
	$(PY) benchmarks/whole_layer.py --rows 16 --ratio-rows 4 --rounds 2

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first so the extension compiles against it (--no-build-isolation).
$(STAMP): $(VENV)/bin/python $(SOURCES)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	$(PY) -c "import weightablate, sys; print('weightablate', weightablate.__version__, 'compiled ops:', weightablate.ops.compiled_backends())"
	touch $(STAMP)

clean:
	rm -rf build weightablate/*.so $(VENV)
