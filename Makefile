# The two commands a user needs: `make demo` and `make test`. Both install first, idempotently.
PYTHON ?= python3
# One stamp per Python environment, so switching venvs re-installs there.
ENV_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
STAMP := .stamps/install-$(ENV_ID)
SOURCES := setup.py pyproject.toml Makefile $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install test demo bench gpu-data gpu-check clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	$(PYTHON) -m pip install --quiet "setuptools>=64" wheel torch triton numpy tqdm pytest matplotlib
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .
	$(PYTHON) -c "import maskprune._C"
	@mkdir -p .stamps && touch $@

test: install
	$(PYTHON) -m pytest -q -rs tests

demo: install
	$(PYTHON) -m maskprune demo

bench: install
	$(PYTHON) scripts/bench_cpu.py

# GPU bring-up (docs: README "GPU check"). Here: `make gpu-data` puts the verified MNIST file in .gpu-data/.
# On the GPU machine (no registry, nothing to fetch): `make gpu-check OUT=DIR` builds, tests, trains and benchmarks
# with what its python3 has; no `install` prerequisite, which would pip-install from a registry.
OUT ?= gpu-check-out
gpu-data: install
	$(PYTHON) scripts/gpu_check.py --prepare-data --data-root .gpu-data

gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $(OUT)

clean:
	rm -rf build .stamps maskprune/_C*.so *.egg-info
