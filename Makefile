# t2i — run `make help` for the targets. The first call of any target creates .venv and installs
# the package (a stamp file keeps later calls fast).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp   # t2i and what it needs to run: the training targets wait only for this
DEV    := $(VENV)/.dev-stamp         # and the test suite's tools (diffusers, transformers, pytest, ruff)
DATA   := data/shapes
ARGS   ?=
RECIPE ?= recipes/ldm.yaml
PROMPT ?= a large red circle in the top left on a white background

.DEFAULT_GOAL := help
.PHONY: help install data train-vae train-ldm train-unclip train-imagen train-glide generate test test-slow lint bench claims config-docs clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $(STAMP)

$(DEV): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(DEV)

install: $(DEV)  ## create .venv and install t2i with its dev tools (once)

data: $(STAMP)  ## write the built-in shapes dataset to data/shapes (idempotent, ~10 s)
	$(PY) data_prep/make_shapes.py --out $(DATA)

train-vae: data  ## train the tiny VAE on shapes on CPU and write its export (runs/tiny-vae/export)
	$(PY) -m t2i.cli.train experiment=tiny/vae $(ARGS)

train-ldm: $(STAMP)  ## the main job: shapes -> VAE -> latents -> LDM -> evaluation -> samples (recipes/ldm.yaml)
	$(PY) -m t2i.cli.recipe $(RECIPE) $(ARGS)

train-unclip: $(STAMP)  ## unCLIP: shapes -> CLIP -> embeddings -> prior -> decoder -> upsampler -> evaluation (recipes/unclip.yaml)
	$(PY) -m t2i.cli.recipe recipes/unclip.yaml $(ARGS)

train-imagen: $(STAMP)  ## Imagen: shapes -> CLIP text tower (frozen) -> text states -> base 16px -> SR 64px -> classifier -> evaluation
	$(PY) -m t2i.cli.recipe recipes/imagen.yaml $(ARGS)

train-glide: $(STAMP)  ## GLIDE: shapes -> base 16px -> upsampler 64px, text encoders trained jointly -> evaluation (recipes/glide.yaml)
	$(PY) -m t2i.cli.recipe recipes/glide.yaml $(ARGS)

generate: $(STAMP)  ## images from the last train-ldm: make generate PROMPT="a large red circle in the top left on a white background"
	$(PY) -m t2i.cli.generate prompt="$(PROMPT)" $(ARGS)

test: $(DEV)  ## run the test suite (fast tests; CI runs this)
	$(PY) -m pytest -q

test-slow: $(DEV)  ## run the slow tests too
	$(PY) -m pytest -q -m "not gpu"

lint: $(DEV)  ## ruff
	$(VENV)/bin/ruff check src tests data_prep benchmarks tools

bench: data  ## data-throughput and VAE-throughput benchmarks (prints figures)
	$(PY) benchmarks/data_throughput.py

claims: $(DEV)  ## the papers' claims in miniature -> docs/claims.md (after train-ldm, -imagen, -unclip and -glide; ARGS="--only cfg --merge")
	$(PY) benchmarks/claims.py $(ARGS)

config-docs: $(DEV)  ## regenerate docs/configuration.md from configs/ (ARGS=--check: fail if it is stale)
	$(PY) tools/config_reference $(ARGS)

clean:  ## remove runs and generated data (keeps .venv)
	rm -rf runs data
