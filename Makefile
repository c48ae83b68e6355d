# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
PY := .venv/bin/python
.PHONY: setup demo test
setup:
	@bash scripts/setup_env.sh
demo: setup
	$(PY) -m deploy.cli demo
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests
