# Quick start: `make demo` (install + demo), `make test` (install + the whole test suite,
# what CI runs), `make test-fast` (the tests that need no cluster, S3 or minutes of CPU).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
BROWSER := $(VENV)/.browser

.PHONY: demo test test-fast lint browser bench-docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# --no-compile: a module's bytecode is written as it is first imported, not all 7 GB's now
	$(VENV)/bin/pip install -q --no-compile -c constraints.txt -e '.[test]'
	$(VENV)/bin/python -c "import insectlib, ray, torch, torchvision, moto, playwright, xdist"
	touch $(STAMP)

# Debian's chromium for the review page's browser tests (Playwright's own browser download
# is not used); installed once, as root, where it is missing.
$(BROWSER):
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "chromium could not be installed: the browser tests will be skipped"
	mkdir -p $(VENV)  # beside the virtualenv's install, which may not have made it yet
	touch $(BROWSER)

demo: $(STAMP)
	$(VENV)/bin/insect demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo

# Two pytest workers, each with its own Ray cluster and S3 server: one worker's process
# starts and waits run while the other computes. A test module runs whole in one worker
# (loadscope): its module fixtures are set up once.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The browser's install runs beside the virtualenv's.
test:
	$(MAKE) --no-print-directory -j2 lint $(BROWSER)
	$(PYTEST)

test-fast: lint
	$(PYTEST) -m "not ray and not s3 and not slow"

# docs/performance.md from the measurements in bench/results/*.json
bench-docs: $(STAMP)
	$(VENV)/bin/python bench/performance_page.py

clean:
	rm -rf demo-output
