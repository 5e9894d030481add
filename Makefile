# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch first: 2.14.1 comes from local disk (see shared/design.md section 5); numpy is needed by
# the Triton interpreter and is not pulled in by torch.
TORCH   ?= torch==2.14.1
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton

.PHONY: install test demo lint inspect clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) numpy
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n 2 --dist loadgroup tests

demo: $(STAMP)
	$(PY) -m xgblora_fast.demo

inspect: $(STAMP)
	$(PY) -m xgblora_fast.inspect

clean:
	rm -rf $(VENV) .cache build *.egg-info
