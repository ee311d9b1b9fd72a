# talkstream: two commands on a fresh machine — `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed

.PHONY: install demo test lint bench clean

# a checkout kept across a replaced environment: the stamp is stale when the package does not import from outside it
ifneq ($(shell cd / && $(PYTHON) -c "import talkstream" 2>/dev/null && echo ok),ok)
$(shell rm -f $(STAMP))
endif

$(STAMP): pyproject.toml Makefile
	# system libraries: espeak-ng (speech), libEGL/libGL (skia-python's renderer links them), chromium (serve's browser test)
	@{ command -v espeak-ng >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 && ldconfig -p | grep -q 'libEGL.so.1' && ldconfig -p | grep -q 'libGL.so.1'; } || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng libegl1 libgl1 chromium >/dev/null; }
	# the CPU wheel first (local on these machines), then a range that it satisfies: no CUDA download
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,encoders,faces,livekit,pipecat,serve]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

demo: install
	$(PYTHON) -m talkstream.cli demo --out out/demo.mp4

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install lint
	$(PYTHON) -m pytest -q -n 2 -p no:benchmark

bench: install
	$(PYTHON) benchmarks/world_speed.py

clean:
	rm -rf .make out .pytest_cache
