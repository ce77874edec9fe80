# Set-up and the everyday commands. `make demo` and `make test` work on a fresh Debian machine.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint bench bench-quality bench-incremental bench-stream bench-batch bench-softmax bench-explain clean

setup: $(VENV)/.installed

# Debian packages the tests start, each installed only where its command is missing:
# redis-server, prometheus (which brings promtool) and chromium (the page's browser tests).
$(VENV)/.installed: pyproject.toml
	@missing="$$(for pair in redis-server:redis-server promtool:prometheus chromium:chromium; do \
		command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done)"; \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends $$missing; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[train,test]'
	touch $@

demo: setup
	$(VENV)/bin/interest demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: bench-incremental bench-quality bench-stream bench-batch

bench-incremental: setup
	$(PY) bench/incremental.py

bench-quality: setup
	$(PY) bench/quality.py

bench-stream: setup
	$(PY) bench/stream.py

bench-batch: setup
	$(PY) bench/batch.py

bench-explain: setup
	$(PY) bench/explain.py

bench-softmax: setup
	$(PY) bench/softmax.py --data ml-1m
	$(PY) bench/softmax.py --data beauty

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
