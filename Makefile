# The README's commands: `make demo`, `make test` (everything; what CI runs) and `make test-fast` (no Ray, vLLM or
# DeepSpeed-in-Ray: pure math and unit tests, under a minute). Each creates .venv on first use.
PY := .venv/bin/python
.PHONY: setup demo test test-fast
setup:
	@bash scripts/setup_env.sh
demo: setup
	$(PY) -m coreseg.deploy.cli demo
test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests
