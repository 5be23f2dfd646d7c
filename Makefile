# The two commands of the README: `make demo` and `make test` (plus `make bench` and `make study`).
PYTHON ?= python3
VENV ?= .venv
# Pin torch so a CPU machine never pulls a multi-GB CUDA build; override on GPU clusters, e.g.
#   make demo TORCH_SPEC="torch==2.11.0"
TORCH_SPEC ?= torch==2.13.0
ARCH ?= transformer
PY := $(VENV)/bin/python
# One process per GPU where there are GPUs, else 2 CPU processes (data parallel over gloo).
NPROC ?= $(shell $(PY) -c "import torch; print(torch.cuda.device_count() or 2)")
DEMO_STEPS ?= 300
DEMO_RUN := runs/demo-$(ARCH)

.PHONY: install demo test bench study gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

# Prepare a real corpus (this interpreter's standard library), pretrain with $(NPROC) processes, stop at
# half way as a preempted job would, then run the same command again: it resumes from the checkpoint.
demo: install
	$(PY) -m data.prepare --input stdlib --output .data/stdlib --max-bytes 6000000 --val-fraction 0.02
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pretrain.train \
		--config configs/$(ARCH)-tiny.toml --train.run_dir=$(DEMO_RUN) --train.steps=$(DEMO_STEPS) \
		--train.exit_after_steps=$$(( $(DEMO_STEPS) / 2 ))
	@echo "--- stopped at half way; the same command resumes from the newest checkpoint ---"
	$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) -m pretrain.train \
		--config configs/$(ARCH)-tiny.toml --train.run_dir=$(DEMO_RUN) --train.steps=$(DEMO_STEPS)
	@echo "--- TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_RUN)/tb ; metrics: $(DEMO_RUN)/metrics.jsonl ---"

test: install
	$(PY) -m pytest -q -ra

bench: install
	$(PY) -m bench.ops
	$(PY) bench/train_throughput.py --arch transformer fox gla rwkv7 --vocab-size 257
	$(PY) bench/comm.py
	$(PY) bench/data.py

# A throughput study (configs/studies/tiny.toml: about a minute on 2 CPU cores); report in runs/studies/tiny/.
study: install
	$(PY) -m launch sweep configs/studies/tiny.toml --cluster configs/clusters/cpu-gloo.toml

# Wheels the lent GPU machines lack, for their CPython 3.12 on manylinux x86_64 (they have torch, triton,
# transformers, safetensors, tokenizers, numpy, matplotlib, tensorboard, einops and pyyaml, and no package
# index), into the ignored .whl/ that `bash bench/gpu_suite.sh` installs from. Every dependency is named: pip fetches none.
GPU_WHEELS ?= fla-core==0.6.0 flash-linear-attention==0.6.0 webdataset==1.0.2 braceexpand==0.1.7 crc32c==2.9.post0
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	@du -sh .whl && ls .whl

clean:
	rm -rf runs .data $(VENV)
