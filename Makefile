# reparam_mm: `make demo` (the main job) and `make test`. Both set up .venv first.
PY ?= python3
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=
# `make test` runs the suite in TEST_WORKERS pytest-xdist processes, each with its share of the
# cores (tests/conftest.py); on 2 cores two one-threaded workers take about 2/3 of one two-threaded
# process's time. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: setup test demo bench env device-wheels device-mmcv test-ecosystem
setup:
	$(PY) tools/setup_env.py

demo: setup
	$(VENV_PY) tools/demo.py

test: setup
	$(VENV_PY) -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

env: setup
	$(VENV_PY) -m reparam_mm.env

# `make device-wheels`: what tools/device_check.sh needs on the lent GPU machine (Python 3.12, no
# internet) and its image lacks, downloaded into .whl/ (git-ignored); docs/gpu.md says how to run it.
device-wheels: setup
	tools/prepare_device_wheels.sh

# `make device-mmcv`: mmcv with CUDA ops for the GPU machine (Python 3.12, torch 2.11.0, sm_90),
# built here with nvcc into .whl/mmcv/ so the device call carries it and compiles nothing
# (tools/build_device_mmcv.sh; about 15 minutes on 2 cores once, seconds after).
device-mmcv:
	tools/build_device_mmcv.sh

# `make test-ecosystem`: the tests marked `ecosystem` (timm's and mmpretrain's real re-parameterisable
# models through reparam_mm.fuse, the mmpretrain configs), which skip in `make test`: both libraries
# import torchvision, which imports only beside the torch it was built for. They run in the venv of
# `make device-mmcv` (the GPU machine's Python 3.12 and torch 2.11, with torchvision, timm and
# mmpretrain), where a library that does not import fails them.
DEVICE_VENV ?= $(or $(REPARAM_MM_CACHE),$(HOME)/.cache/reparam_mm)/device-py3.12-torch2.11.0
test-ecosystem:
	@test -x $(DEVICE_VENV)/bin/python || { echo "test-ecosystem: no venv at $(DEVICE_VENV); run make device-wheels device-mmcv first (it makes it, with torchvision, timm and mmpretrain)." >&2; exit 1; }
	REPARAM_MM_ECOSYSTEM=required PYTHONPATH=. $(DEVICE_VENV)/bin/python -m pytest -p no:cacheprovider -m ecosystem $(PYTEST_ARGS)

# `make bench`: CPU speed / memory figures of docs/benchmarks.md (~25-30 min on 2 cores; never
# part of `make test`). JSON goes to $(BENCH_DIR); the report fills the doc's blocks from every
# JSON there (cuda_*.json from a GPU run included) and draws $(BENCH_PLOTS)/*.png.
BENCH_DIR ?= work_dirs/bench
BENCH_SHAPE ?= 512 512
BENCH_REPEAT ?= 5
BENCH_TRAIN_REPEAT ?= 3
BENCH_DOC ?= docs/benchmarks.md
BENCH_PLOTS ?= docs/benchmarks
BENCH := $(VENV_PY) tools/benchmark.py --shape $(BENCH_SHAPE)
UPER_R50 := configs/doconv/upernet_r50_4xb4-160k_ade20k-512x512.py
UPER_R50_DO := configs/doconv/upernet-doconv_r50-doconv-c3-c5_4xb4-160k_ade20k-512x512.py
FRCNN_R50 := configs/doconv/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py
FRCNN_R50_DO := configs/doconv/faster-rcnn-doconv_r50-doconv-c3-c5_fpn_4conv1fc_1x_coco.py
UPER_REPLK := configs/replknet/upernet_replknet-31b-in1k-pre_64xb2-40k_ade20k-512x512.py

bench: setup
	mkdir -p $(BENCH_DIR)
	$(BENCH) --compare $(UPER_R50):fused $(UPER_R50_DO):fused --repeat $(BENCH_REPEAT) --warmup 1 --out $(BENCH_DIR)/cpu_fused-doconv-vs-plain_upernet-r50.json
	$(BENCH) --compare $(UPER_R50_DO):unfused $(UPER_R50_DO):fused --repeat $(BENCH_REPEAT) --warmup 1 --out $(BENCH_DIR)/cpu_unfused-vs-fused_upernet-r50-doconv.json
	$(BENCH) --compare $(UPER_REPLK):unfused $(UPER_REPLK):fused --repeat $(BENCH_REPEAT) --warmup 1 --out $(BENCH_DIR)/cpu_unfused-vs-fused_upernet-replknet-31b.json
	$(BENCH) --compare $(UPER_R50) $(UPER_R50_DO) --mode train --batch 2 --repeat $(BENCH_TRAIN_REPEAT) --warmup 1 --no-flops --out $(BENCH_DIR)/cpu_train-overhead_upernet-r50.json
	$(BENCH) --compare $(FRCNN_R50) $(FRCNN_R50_DO) --mode train --batch 2 --repeat $(BENCH_TRAIN_REPEAT) --warmup 1 --no-flops --out $(BENCH_DIR)/cpu_train-overhead_faster-rcnn-r50.json
	$(BENCH) --doconv-layers --batch 2 --out $(BENCH_DIR)/cpu_doconv-layers.json
	$(BENCH) --large-dw --batch 1 --out $(BENCH_DIR)/cpu_large-dw.json
	$(BENCH) $(UPER_REPLK) --mode train --batch 2 --repeat 2 --warmup 1 --no-flops --out $(BENCH_DIR)/cpu_train_upernet-replknet-31b.json
	$(BENCH) $(UPER_REPLK) --mode train --batch 2 --repeat 2 --warmup 1 --no-flops --dw-fft-min-kernel 1000 --out $(BENCH_DIR)/cpu_train_upernet-replknet-31b_direct-dw.json
	$(VENV_PY) tools/bench_report.py $(BENCH_DIR)/*.json --doc $(BENCH_DOC) --plots $(BENCH_PLOTS)
