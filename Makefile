PYTHON ?= python
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: help install test rehearse run bench bench-gpu data clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install:  ## install the package (editable) with everything `make test` and `make bench` need
	$(PYTHON) -m pip install -e ".[dev,bench,cluster,autoattack]"

test:  ## run the test suite (CPU, embedded data, no network)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

run:  ## run the default job: the whole report on the embedded digits
	$(PYTHON) -m robustness

rehearse:  ## run every experiment in experiments/ with debug=rehearsal on small data in each real layout
	$(PYTHON) -m robustness.rehearse

bench:  ## print the benchmark tables (ratios measured side by side)
	$(PYTHON) -m robustness.bench

bench-gpu:  ## GPU benchmarks: training images/s and peak memory, plain and CURE, and the Tiny-ImageNet loader
	$(PYTHON) -m robustness.bench gpu

data:  ## make Fashion-MNIST available offline (the Debian package where apt-get exists; else how to download)
	sh scripts/get_data.sh

clean:  ## remove outputs, the model store and caches of this folder
	rm -rf outputs artifacts multirun .pytest_cache
