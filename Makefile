# One-command set-up and the project's jobs. Every target that needs Python depends on `setup`,
# which is idempotent: a stamp file makes a second run take a second.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
OS_LIBS := libusb-1.0-0 libgl1 libgomp1

# Offline and loopback-only by default: tests, the demo and benches never reach the network and
# Ray binds to 127.0.0.1.
export HF_HUB_OFFLINE ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONDONTWRITEBYTECODE ?= 1

.PHONY: setup os-libs test test-shared test-datagen test-trainer lint demo bench bench-synthetic study-rescan chaos \
        gpu-check gpu-bundle finetune-kitti finetune-nyu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory os-libs
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[datagen,trainer,dev]"
	@touch $(STAMP)
	@echo "setup done: $(VENV)"

# Open3D needs libusb and libGL at import time; install them with apt-get when root.
os-libs:
	@missing=""; for lib in libusb-1.0.so.0 libGL.so.1 libgomp.so.1; do \
	  ldconfig -p | grep -q "$$lib" || missing="$$missing $$lib"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	    echo "installing OS libraries for Open3D:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(OS_LIBS) >/dev/null; \
	  else \
	    echo "Open3D needs OS libraries that are missing:$$missing"; \
	    echo "run: sudo apt-get install -y $(OS_LIBS)"; exit 1; \
	  fi; \
	fi

# pytest once per package; exit code 5 ("no tests collected") is not a failure for an empty package.
# One pytest per package (their conftests differ), each spread over the CPU cores (pytest-xdist; most
# tests are single-threaded). TEST_JOBS=0: one test at a time.
TEST_JOBS ?= auto
test: setup
	@status=0; for d in tests/shared tests/datagen tests/trainer; do \
	  echo "== pytest $$d"; $(BIN)/pytest -n $(TEST_JOBS) $$d; rc=$$?; \
	  if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then status=1; fi; done; exit $$status

test-shared test-datagen test-trainer: test-%: setup
	$(BIN)/pytest tests/$*

lint: setup
	$(BIN)/ruff check datagen trainer shared tests bench scripts

# The main job, offline: synthetic data -> pre-training -> fine-tuning variants -> evaluation table.
demo: setup
	$(BIN)/python scripts/ablation.py --preset demo

# The same ablation at a larger scale. SCALE=bench (bpnet-s, 4000 scenes at 608x192; for a GPU or a
# long CPU run) or SCALE=cpu (~1.5 h on 2 CPU cores); ARGS="--n-pretrain 8000 --pretrain-steps 20000"
# changes any number. Output: runs/synthetic-$(SCALE)/results.json. (Not PRESET: finetune-* use that.)
SCALE ?= bench
bench-synthetic: setup
	$(BIN)/python scripts/ablation.py --preset $(SCALE) $(ARGS)

# What a new scan every epoch does (trainer pretrain --lidar): stored scans vs re-simulated ones vs the target
# rig's pattern only, zero-shot and fine-tuned, with the sparsity sweep. SCALE as above (demo: 68.5 min on
# 2 CPU cores with ARGS="--seeds 4", the README's table; the default is 3 seeds). Output: runs/rescan-$(SCALE)/.
study-rescan: setup
	$(BIN)/python scripts/rescan_study.py --preset $(SCALE) $(ARGS)

bench: setup
	$(BIN)/python bench/run_all.py

chaos: setup
	$(BIN)/python bench/chaos.py

# Every CUDA path once (teacher bf16/fp32, bf16 training, CUDA 4-NN, nccl DDP, datagen with the teacher on
# the GPU), under 8 minutes on one GPU: bench/RESULTS-gpu.md, exit 1 on a failed check. ARGS="--parts 2,3".
gpu-check: setup
	$(BIN)/python bench/gpu_check.py $(ARGS)

# What a lent GPU machine (no internet, torch + transformers + numpy, 64 MiB carried) lacks for the GPU check:
# wheels from PyPI into bench/gpu-bundle/ (git-ignored, ~53 MiB; bench/gpu_bundle.py says which and why), for
# the machine's CPython, GPU_PYTHON (the lent machines': 3.12). gpu_check.py finds and unpacks it by itself.
GPU_PYTHON ?= 3.12
gpu-bundle: setup
	$(BIN)/python bench/gpu_bundle.py build --python-version $(GPU_PYTHON)

# Fine-tune and evaluate on a labelled set (docs/finetune.md): shards when missing, trainer finetune
# --resume, trainer eval. Variables: KITTI_ROOT / NYU_ROOT (required), TEACHER, INIT, MODEL, STEPS, OUT,
# SHARDS, CROP, EVAL_CROP, PRESET, BATCH_SIZE, DATAGEN_ARGS, TRAIN_ARGS; unset ones take the defaults.
finetune-kitti: setup
	@$(BIN)/python scripts/finetune.py kitti --root "$(KITTI_ROOT)" --teacher "$(TEACHER)" --init "$(INIT)" \
	  --model "$(MODEL)" --steps "$(STEPS)" --out "$(OUT)" --shards "$(SHARDS)" --crop "$(CROP)" \
	  --eval-crop "$(EVAL_CROP)" --preset "$(PRESET)" --batch-size "$(BATCH_SIZE)" \
	  --datagen-args "$(DATAGEN_ARGS)" --train-args "$(TRAIN_ARGS)"

finetune-nyu: setup
	@$(BIN)/python scripts/finetune.py nyu --root "$(NYU_ROOT)" --teacher "$(TEACHER)" --init "$(INIT)" \
	  --model "$(MODEL)" --steps "$(STEPS)" --out "$(OUT)" --shards "$(SHARDS)" --crop "$(CROP)" \
	  --eval-crop "$(EVAL_CROP)" --preset "$(PRESET)" --batch-size "$(BATCH_SIZE)" \
	  --datagen-args "$(DATAGEN_ARGS)" --train-args "$(TRAIN_ARGS)"

clean:
	rm -rf runs/demo shards/synthetic .pytest_cache
