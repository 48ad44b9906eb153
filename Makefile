# The whole workflow: make setup | train | benchmark | zip | test | runs
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2

DATA ?= data/training_set.npz
PROFILE ?=
NAME ?=
ARGS ?=
RUN ?=
TEST ?=
N ?=
CPUS ?= 2
LIMIT ?= 6000
MARGIN ?= 0.5
VENDOR_ORT ?= 0
SKIP_BENCHMARK ?= 0
OUT ?=

.PHONY: setup train benchmark zip test runs augment evaluate tune clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -c constraints.txt
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m trainer train --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) $(if $(NAME),--name $(NAME)) $(ARGS)

augment: $(STAMP)
	$(PY) -m trainer augment --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) --out augmented.png $(ARGS)

benchmark: $(STAMP)
	$(PY) -m benchmark $(if $(RUN),--run $(RUN)) $(if $(TEST),--test $(TEST)) $(if $(N),--n $(N)) \
		--cpus $(CPUS) --limit $(LIMIT) --margin $(MARGIN) $(ARGS)

zip: $(STAMP)
	$(PY) -m benchmark.pack $(if $(RUN),--run $(RUN)) $(if $(filter 1,$(VENDOR_ORT)),--vendor-ort) \
		$(if $(filter 1,$(SKIP_BENCHMARK)),--skip-benchmark) $(if $(OUT),--out $(OUT)) \
		--cpus $(CPUS) --limit $(LIMIT) --margin $(MARGIN)

evaluate: $(STAMP)
	$(PY) -m trainer evaluate --model $(if $(RUN),$(RUN),submission) --data $(if $(TEST),$(TEST),$(DATA)) $(ARGS)

tune: $(STAMP)
	$(PY) -m trainer tune --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

runs: $(STAMP)
	$(PY) -m trainer runs $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean-venv:
	rm -rf $(VENV)
