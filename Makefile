# The two commands of the README. Both do their own set-up on a fresh machine.
PYTHON ?= python3
export MAX_JOBS ?= 2

.PHONY: install rebuild quickstart test lint

# The editable install compiles the C++ extension (minutes on 2 cores); it is skipped when
# tools/install_stamp.py finds this checkout installed and nothing the build reads changed since.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0 "setuptools>=77" wheel ninja pybind11 packaging
	@if $(PYTHON) tools/install_stamp.py check; then \
		echo "harmonica: installed from this checkout, build inputs unchanged: not rebuilding (make rebuild forces it)"; \
	else \
		$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test]" && $(PYTHON) tools/install_stamp.py write; \
	fi

rebuild:
	rm -f build/install-stamp.json
	$(MAKE) install

quickstart: install
	harmonica quickstart

# A backend that fails to build fails the run (instead of skipping its tests). The benchmarks
# run once each in smoke mode so they never rot; `pytest benchmarks` times them for real.
test: install
	HARMONICA_REQUIRE_BACKENDS=cpp,triton $(PYTHON) -m pytest tests benchmarks --benchmark-disable -q

lint:
	ruff check .
