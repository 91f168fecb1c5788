# Two commands for a new user: `make demo` and `make test`. Both create the environment first.
# uv resolves torch + torchvision from the lockfile (the machine's pip would pick a CPU-only torch that breaks
# torchvision's import), so uv itself is installed into a private venv with nothing but pip.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_COMPILE_BYTECODE := 1
export UV_LINK_MODE := copy

.PHONY: env demo lint test test-fast test-gpu bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra test --python $(PYTHON)
	touch $@

env: $(VENV)/.synced

demo: env
	$(VENV)/bin/bdo quickstart

lint: env
	$(VENV)/bin/ruff check methods orchestrator benchmarks tests
	$(VENV)/bin/ruff format --check methods orchestrator benchmarks tests

test: env lint
	@sh scripts/browser-deps.sh
	$(VENV)/bin/python -m pytest tests --durations=30 -n 2 --dist loadgroup

test-fast: env
	$(VENV)/bin/python -m pytest tests -m "not slow" -n 2 --dist loadgroup

# The pure-torch tests (methods, efficacy included, and units) on CUDA. Meant for a GPU box that may have only
# torch, torchvision and pytest: it uses .venv when there is one, else $(PYTHON) as it is, and tests that need
# Ray or MLflow skip themselves. Without a visible GPU every test is skipped, with the reason.
TEST_PYTHON := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,$(PYTHON))
test-gpu:
	$(TEST_PYTHON) -m pytest tests/methods tests/unit --device cuda -p no:cacheprovider --durations=20

bench: env
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
