# The two commands of the README. Both do their own set-up on a fresh machine.
PYTHON ?= python3
export MAX_JOBS ?= 2

.PHONY: install quickstart test lint

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0 setuptools wheel ninja pybind11
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test]"

quickstart: install
	harmonica quickstart

# A backend that fails to build fails the run (instead of skipping its tests). The benchmarks
# run once each in smoke mode so they never rot; `pytest benchmarks` times them for real.
test: install
	HARMONICA_REQUIRE_BACKENDS=cpp,triton $(PYTHON) -m pytest tests benchmarks --benchmark-disable -q

lint:
	ruff check .
