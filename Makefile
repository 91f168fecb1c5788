# Two commands for a new user: `make demo` and `make test`. Both create the environment first.
# uv resolves torch + torchvision from the lockfile (the machine's pip would pick a CPU-only torch that breaks
# torchvision's import), so uv itself is installed into a private venv with nothing but pip.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_COMPILE_BYTECODE := 1
export UV_LINK_MODE := copy

.PHONY: env demo test test-fast bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra test --python $(PYTHON)
	touch $@

env: $(VENV)/.synced

demo: env
	$(VENV)/bin/bdo quickstart

test: env
	@sh scripts/browser-deps.sh
	$(VENV)/bin/python -m pytest tests --durations=30

test-fast: env
	$(VENV)/bin/python -m pytest tests -m "not slow"

bench: env
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
