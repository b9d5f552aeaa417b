# The two commands of the README:  make demo  and  make test.
# Both set up .venv first (re-done only when the dependency files change).
VENV := .venv
STAMP := $(VENV)/.setup-stamp
PY := $(VENV)/bin/python
BUF := npx --yes @bufbuild/buf@1.75.0

.PHONY: setup demo test lint protos check-protos buf-lint clean

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	./scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunedock demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check services tunedock/*.py tests bench scripts
	cd protos && $(BUF) lint

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
