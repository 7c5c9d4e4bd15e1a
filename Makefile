# lightning-sgl: two commands do all set-up on a fresh machine.
#   make demo   - create .venv if missing, install, run the main job
#   make test   - create .venv if missing, install, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

$(STAMP): constraints.txt pyproject.toml setup.py scripts/install.sh $(wildcard torchrec_ext/csrc/*.cpp)
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py
	$(PY) examples/train_ctr.py fit --config examples/configs/synthetic_dlrm.yaml

test: $(STAMP)
	$(PY) -m ruff check lightning_sgl torchrec_ext tests examples benchmarks scripts
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check lightning_sgl torchrec_ext tests examples benchmarks scripts

format: $(STAMP)
	$(PY) -m ruff format lightning_sgl torchrec_ext tests examples benchmarks scripts

bench: $(STAMP)
	$(PY) benchmarks/bench_dense.py
	OPENBLAS_NUM_THREADS=1 $(PY) benchmarks/bench_fused.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
