# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build that lies on this machine's disk. Elsewhere PyPI's Linux wheel of the same
# version is a CUDA build: pass PIP_TORCH_ARGS="--index-url <PyTorch's CPU wheel index>" to
# avoid it, or TORCH_SPEC for the build you want.
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# LSL discovery stays on this machine in everything make runs.
export LSLAPICFG := $(CURDIR)/tools/lsl_api.cfg

.PHONY: demo replay predict broker test install data lint train results results-more one-sensor emg clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(STAMP)

## demo: stream the shipped held-out session through the shipped model at 20x real time,
## with a 60 s gyroscope loss mid-replay (configs/replay.yaml); about 30 s
demo: $(STAMP)
	$(BIN)/crossl-stream run configs/replay.yaml

## replay: the same session as fast as possible (virtual clock), then the summary
replay: $(STAMP)
	$(BIN)/crossl-stream replay --speed max --drop gyro:200:60 --print-every 50

## predict: offline batch prediction of the shipped session, scored by its label markers
predict: $(STAMP)
	$(BIN)/crossl-stream predict

## data: fetch the real recordings (PyPI packages seglearn, aeon, geomstats) into the data
## cache, as XDF sessions
data: $(STAMP)
	$(BIN)/python tools/fetch_datasets.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## broker: mosquitto for the MQTT tests (Debian packages; the tests start it themselves)
broker:
	@command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null; } || \
	  echo "make: mosquitto is missing: apt-get install mosquitto mosquitto-clients (as root)"

## test: lint, then the suite inside a private network namespace (loopback only)
test: $(STAMP) data lint broker
	tools/in-netns $(BIN)/python -m pytest

## train: retrain the default model (models/default) from the watch sessions
train: data
	$(BIN)/crossl-stream train configs/train-watch.yaml --out models/default --fresh \
	    --device $(DEVICE)

## results: the watch protocol (ablation on validation subjects, then 10 folds x 3 seeds,
## and the fallback models per fold; 67 min on 2 CPU cores with AVX512-BF16 and AMX, in bf16;
## on CPUs without BF16 set precision: fp32 in the spec, about 113 min)
## -> docs/results/watch/report.md and the shipped model's
## metrics.json and card; JOBS folds at once (one per core); on a GPU machine
## `make results DEVICE=cuda` (every job on the one GPU)
JOBS ?= 2
DEVICE ?= cpu
results: data
	$(BIN)/crossl-stream eval configs/train-watch.yaml --out docs/results/watch --jobs $(JOBS) \
	    --device $(DEVICE)
	cp docs/results/watch/metrics.json models/default/metrics.json
	$(BIN)/crossl-stream card models/default

## results-more: the other data sets (BasicMotions: a check that saturates; EMG across
## sessions and across people)
results-more: data
	$(BIN)/crossl-stream eval configs/train-basicmotions.yaml --out docs/results/basicmotions
	$(BIN)/crossl-stream eval configs/train-emg.yaml --out docs/results/emg --jobs $(JOBS) \
	    --device $(DEVICE)
	$(BIN)/crossl-stream eval configs/train-emg.yaml --by subject \
	    --out docs/results/emg-cross-person --jobs $(JOBS) --device $(DEVICE)

## one-sensor: supervised trained on each watch sensor alone, leave-one-subject-out (22 min
## on 2 CPU cores): with two sensors, what the fallback models do
one-sensor: data
	$(BIN)/python tools/one_sensor_bound.py configs/train-watch.yaml --against docs/results/watch \
	    --out docs/results/watch-one-sensor --jobs $(JOBS) --device $(DEVICE)

## emg: the own-recordings workflow on real sEMG, CLI only: pretrain on the other sessions
## without labels, fine-tune on 10% of their labels, replay the held-out session (rr/2);
## --fresh: a rerun after the spec changed starts over instead of refusing the old checkpoint
emg: data
	$(BIN)/crossl-stream pretrain configs/train-emg.yaml --out models/emg-pretrained --fresh
	$(BIN)/crossl-stream finetune configs/train-emg.yaml --from models/emg-pretrained \
	    --out models/emg --labels-fraction 0.1 --fresh
	$(BIN)/crossl-stream run configs/replay-emg.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
