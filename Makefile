# FaceAdapt: the two commands of README.md are `make serve` and `make test`; both set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup serve test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# facexlib and facenet-pytorch pin old torch releases: their real needs are in pyproject.toml
	$(PY) -m pip install -q --no-deps 'facexlib==0.3.0' 'facenet-pytorch==2.6.0'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/faceadapt serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(VENV)/bin/lint-imports  # the import layers and contracts of pyproject.toml [tool.importlinter]
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
