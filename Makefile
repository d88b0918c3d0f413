# One command each (see README.md):
#   make demo   set up .venv, build + install sparsekern, run the main job (prune the bundled model, perplexity,
#               SparseLinear conversion, speed table)
#   make test   set up .venv, build + install the wheel, run the test suite against the installed wheel
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find csrc include python tools -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.py' -o -name '*.json' \) 2>/dev/null) setup.py pyproject.toml scripts/requirements.txt

.PHONY: setup demo test doctor dev clean

$(VENV)/.installed: $(SOURCES)
	scripts/setup_env.sh $(VENV)

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/sparsekern demo

doctor: setup
	$(VENV)/bin/sparsekern doctor

test: setup
	$(PY) -m pytest -q tests

# In-place CPU-only developer build (python/sparsekern/_C*.so); use with PYTHONPATH=python.
dev:
	tools/dev_build.sh

clean:
	rm -rf build dist *.egg-info python/sparsekern/_C*.so
