# The two commands of the README:  make demo  and  make test.
# Both set up .venv first (re-done only when the dependency files change): it holds exactly
# requirements/cpu.lock (see `make check-env`, `make lock`).
VENV := .venv
STAMP := $(VENV)/.setup-stamp
PY := $(VENV)/bin/python
LOCK := requirements/cpu.lock
BUF := npx --yes @bufbuild/buf@1.75.0
# Where pip and uv find the CPU build of torch (torch==2.13.0+cpu) on this kind of machine.
TORCH_WHEELS ?= /opt/wheels
FAST := not vllm and not postgres and not slow

.PHONY: setup demo test test-fast lint check-env lock protos check-protos buf-lint console-shots clean

$(STAMP): pyproject.toml $(LOCK) scripts/setup.sh
	./scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunedock demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop: no vLLM engine, no PostgreSQL, no multi-process end-to-end runs.
test-fast: $(STAMP)
	$(PY) -m pytest -m "$(FAST)" $(PYTEST_ARGS)

# The web console's pages as screenshots in docs/console/ (the browser tests, each page written out; needs chromium).
console-shots: $(STAMP)
	mkdir -p docs/console
	TUNEDOCK_CONSOLE_SHOTS=docs/console $(PY) -m pytest -q -p no:cacheprovider tests/console

# Style, the dependency direction (import-linter contracts in pyproject.toml), types, the protos.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	cd protos && $(BUF) lint

# Fails if .venv holds a distribution, or a version, that the lock does not name.
check-env: $(STAMP)
	$(PY) scripts/check_env.py $(LOCK)

# Re-resolve the locks from pyproject.toml (after changing a dependency there): the development
# venv's, and the CPU image's (services and workers, no test tools).
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links $(TORCH_WHEELS) --no-emit-find-links --quiet \
	--no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
lock: $(STAMP)
	$(UV_COMPILE) --extra cpu --extra dev -o $(LOCK)
	$(UV_COMPILE) --extra cpu --extra postgres --extra s3 --extra k8s -o requirements/image-cpu.lock

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

check-protos: $(STAMP)
	$(PY) scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
