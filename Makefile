# The whole workflow: make setup | train | benchmark | zip | test (make help lists every target)
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
LEAN ?= 0
SKIP_BENCHMARK ?= 0
OUT ?=
ZIP ?=
SCORE ?=
NOTE ?=

.PHONY: help setup train benchmark zip grader-check score test test-heavy runs augment evaluate tune lofo \
	options clean-venv

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /\1\t/' | expand -t 12

setup: $(STAMP)  ## virtual environment in .venv with the pinned packages (about a minute)

$(STAMP): requirements.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -c constraints.txt
# Only for the stain-deposit inks that trainer/medmnist_c.py reads; its own dependencies (PyTorch) stay out.
	$(PY) -m pip install --no-deps -c constraints.txt medmnistc
	touch $(STAMP)

train: $(STAMP)  ## clean, split, train, evaluate, export one run (PROFILE=cpu: about 58 min alone)
	$(PY) -m trainer train --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) $(if $(NAME),--name $(NAME)) $(ARGS)

augment: $(STAMP)  ## save augmented.png: training samples after augmentation
	$(PY) -m trainer augment --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) --out augmented.png $(ARGS)

benchmark: $(STAMP)  ## run the submission as Codabench would; PASS when it fits the time limit
	$(PY) -m benchmark $(if $(RUN),--run $(RUN)) $(if $(TEST),--test $(TEST)) $(if $(N),--n $(N)) \
		--cpus $(CPUS) --limit $(LIMIT) --margin $(MARGIN) $(ARGS)

zip: $(STAMP)  ## dist/submission.zip, after checking that it runs (RUN=runs/<name> for another run)
	$(PY) -m benchmark.pack $(if $(RUN),--run $(RUN)) $(if $(filter 1,$(LEAN)),--lean) \
		$(if $(filter 1,$(SKIP_BENCHMARK)),--skip-benchmark) $(if $(OUT),--out $(OUT)) \
		--cpus $(CPUS) --limit $(LIMIT) --margin $(MARGIN)

grader-check: $(STAMP)  ## the grader matrix on dist/submission.zip (ZIP=...): Python 3.9-3.13, TensorFlow 2.17
	$(PY) -m benchmark.grader $(if $(ZIP),--zip $(ZIP)) $(if $(N),--n $(N))

evaluate: $(STAMP)  ## score RUN (default submission/) on TEST (default DATA); ARGS="--corrupt"
	$(PY) -m trainer evaluate --model $(if $(RUN),$(RUN),submission) --data $(if $(TEST),$(TEST),$(DATA)) $(ARGS)

tune: $(STAMP)  ## short runs of augmentation candidates, clean and corrupted
	$(PY) -m trainer tune --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

lofo: $(STAMP)  ## leave one family out: short runs without each corruption family's augmentation
	$(PY) -m trainer tune --leave-one-out --data $(DATA) $(if $(PROFILE),--profile $(PROFILE)) $(ARGS)

runs: $(STAMP)  ## table of every run in runs/
	$(PY) -m trainer runs $(ARGS)

score: $(STAMP)  ## record a zip's leaderboard score in its run: make score SCORE=0.9312 [ZIP=...] [NOTE="..."]
	$(PY) -m trainer score $(if $(ZIP),$(ZIP),dist/submission.zip) $(SCORE) $(if $(NOTE),--note "$(NOTE)") $(ARGS)

test: $(STAMP)  ## ruff, then the test suite without the heavy checks (8-13 min on 2 cores)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not heavy" tests $(ARGS)

test-heavy: $(STAMP)  ## the heavy checks: the grader matrix, the GPU notebook, the gpu profile end to end
	$(PY) -m pytest -q -s -m heavy tests $(ARGS)

options: $(STAMP)  ## regenerate docs/options.md from trainer/config.py
	$(PY) -m trainer options > docs/options.md

clean-venv:  ## remove .venv
	rm -rf $(VENV)
