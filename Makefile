# Set-up is automatic: every target creates .venv (python3 -m venv + pip) when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-full lint docs docs-serve bench bench-gpu clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fastervit demo

test: $(STAMP) docs
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x --durations=15

test-full: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver)
	$(BIN)/python -m pytest -q -m 'full or not full' --durations=15

lint: $(STAMP)
	$(BIN)/ruff check .

# The documentation site (mkdocs-material; API reference from the docstrings; CLI reference from the parsers)
# into site/. --strict turns every warning (broken link, missing docstring target) into a failure.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: $(STAMP)
	$(BIN)/fastervit bench --quick

# One CUDA run of at most 7.5 min (budget guard skips what would not fit): FasterViT-0..4 at batch 128 / 224 px
# (the paper's Figure 1 setting) vs Swin-T, ConvNeXt-T and the official package when installed, plus FasterViT-2 vs
# Swin-T vs ConvNeXt-T backbones at 800x1216 batch 2; bf16 and fp16 autocast, channels_last, torch.compile off and on.
# Writes runs/bench_gpu/bench_gpu.{json,md}. CPU check with tiny settings:
#   $(BIN)/python experiments/bench_gpu.py --dry-run --device cpu --out runs/gpu_dry
bench-gpu: $(STAMP)
	$(BIN)/python experiments/bench_gpu.py --out runs/bench_gpu

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache
