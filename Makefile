# Quick start: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what they need on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; set TORCH_SPEC to install another build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
TEST_WORKERS ?= auto

.PHONY: demo test lint format clean tilelang-cpu-props tilelang-lower gpu-check gpu-props gpu-install gpu-ncu gpu-props-beside gpu-tune gpu-mqar gpu-lm bench-compare bench-html

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,numba,triton,fla,tilelang]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rebased-kernels info
	$(VENV)/bin/rebased-kernels tune --quick --out tune-results
	$(VENV)/bin/rebased-kernels check

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# the triton backend runs on the CPU through Triton's interpreter (fp32, fp16); one
	# pytest-xdist worker per core (TEST_WORKERS), each with its share of the threads
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# On the GPU machine (its python3 has torch; nothing to download): install this checkout
# without dependencies, then oracle check, the property suite with the `gpu` profile on CUDA,
# and side-by-side timings; results go to $(OUT) (the device tool's output folder).
OUT ?= out
WHEELS ?= .whl-gpu
# the property suite is interrupted (SIGINT: pytest still prints which tests failed) after
# PROPS_S seconds; PROPS_N pytest-xdist workers (the GPU machine has 16 cores)
PROPS_S ?= 240
PROPS_N ?= 8
# peers (fla) and asv from a carried offline wheelhouse, when there is one
GPU_INSTALL = mkdir -p $(OUT) && python3 -m pip install -q --no-deps --no-build-isolation -e . \
	&& if [ -d $(WHEELS) ]; then python3 -m pip install -q --no-index --no-deps --no-compile \
	--target /tmp/site $(WHEELS)/*.whl; fi \
	&& if [ -f $(WHEELS)/z3slim.tar.xz ]; then tar xJf $(WHEELS)/z3slim.tar.xz -C /tmp/site; fi \
	&& (python3 -c "import importlib_metadata" 2>/dev/null \
	|| echo "from importlib.metadata import *" \
	> /tmp/site/importlib_metadata.py)
# The device image's site-packages hold no bytecode: every process recompiled torch's
# sources (4.6 s of an 11 s cached `tune`). A writable pycache prefix, with bytecode writes
# allowed, keeps them for the next process.
GPU_ENV = env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache
# default stages of each GPU target (STAGES=a,b overrides; a comma list cannot sit in $(or))
CHECK_STAGES = properties,oracle,fla,profile,timings,stress
TUNE_STAGES = tune,asv
ASV_BACKENDS ?= triton,fla,torch
MQAR_STAGES = reach,speed,table1,iou
LM_STAGES = data,train,speed
PROPS_K ?= triton or fla
PROPS_RUN = $(GPU_ENV) REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda \
	timeout -s INT $(PROPS_S) python3 -m pytest -v -rf -p no:cacheprovider -n $(PROPS_N) \
	tests/test_properties.py tests/test_triton.py -k "$(PROPS_K)" \
	--junitxml=$(OUT)/properties.xml > $(OUT)/properties.txt 2>&1; \
	tail -12 $(OUT)/properties.txt
gpu-check:
	$(GPU_INSTALL)
	$(PROPS_RUN)
	$(GPU_ENV) python3 -m rebased_kernels.gpu_check --out $(OUT) \
		--stages $(or $(STAGES),$(CHECK_STAGES))

gpu-install:
	$(GPU_INSTALL)

# The property suite and, in the same minutes, gpu_check stages that time nothing (BESIDE,
# e.g. `BESIDE="tilelang --tilelang-no-timings"`: compiles and oracle rows) into OUT/beside;
# waits on the suite's own pid (session 7 waited on `pgrep -f`, which matched its own shell).
gpu-props-beside:
	$(GPU_INSTALL)
	( $(PROPS_RUN) ) > $(OUT)/props-tail.txt 2>&1 & pid=$$!; mkdir -p $(OUT)/beside; \
	$(GPU_ENV) python3 -m rebased_kernels.gpu_check --out $(OUT)/beside --stages $(BESIDE) \
	> $(OUT)/beside/log.txt 2>&1; wait $$pid; cat $(OUT)/props-tail.txt; \
	grep -v "TileLang:" $(OUT)/beside/log.txt | tail -30

# Hardware counters of one triton call (Firecracker machines: nvidia-h100-x1), only the
# launches of NCU_PARTS after a warm-up (gpu_ncu run); OUT/ncu.json: a row per kernel.
NCU ?= $(or $(shell command -v ncu 2>/dev/null),/opt/nvidia/nsight-compute/2025.3.1/ncu)
NCU_CONFIG ?= {"variant": "tiles", "chunk_size": 64, "chunks_per_segment": 4, "exact": "x3"}
NCU_T ?= 16384
NCU_PARTS ?= fwd,fwd_bwd
NCU_SECTIONS = SpeedOfLight LaunchStats Occupancy WarpStateStats ComputeWorkloadAnalysis \
	MemoryWorkloadAnalysis InstructionStats SchedulerStats
gpu-ncu:
	$(GPU_INSTALL)
	$(GPU_ENV) $(NCU) --clock-control none --profile-from-start off \
		$(foreach s,$(NCU_SECTIONS),--section $(s)) -f -o $(OUT)/ncu \
		python3 -m rebased_kernels.gpu_ncu run --config '$(NCU_CONFIG)' --T $(NCU_T) \
		--parts $(NCU_PARTS) > $(OUT)/ncu-log.txt 2>&1; tail -5 $(OUT)/ncu-log.txt
	$(NCU) --import $(OUT)/ncu.ncu-rep --page raw --csv > $(OUT)/ncu-raw.csv
	$(GPU_ENV) python3 -m rebased_kernels.gpu_ncu summarise $(OUT)/ncu-raw.csv \
		--json $(OUT)/ncu.json

# the install, then only the property suite (PROPS_K selects: `PROPS_K=triton`)
gpu-props:
	$(GPU_INSTALL)
	$(PROPS_RUN)

# The TileLang property suite on this machine's CPU: TileLang's C target with the GPU's tf32
# products emulated (tests/conftest.py), the float32 draws; PROFILE=gpu for 200 a property.
# Lower every TileLang kernel the GPU property suite builds for sm_90a, on the CPU (~10 min;
# TILES=1: the tile configuration's alone, ~4 min): what fails here fails the GPU's precompile.
tilelang-lower: $(STAMP)
	$(PY) -m rebased_kernels.backends.tilelang.hopper $(if $(TILES),--tiles)

tilelang-cpu-props: $(STAMP)
	REBASED_KERNELS_TILELANG_ON_CPU=1 REBASED_KERNELS_PROFILE=$(or $(PROFILE),dev) \
	$(PY) -m pytest -v -rf -p no:cacheprovider tests/test_properties.py -k "tilelang and float32"

# The tuner on the GPU: `rebased-kernels tune` cold and cached, auto vs the named winner, and
# the asv suite (results filed under the commit in the carried .asvgit/repo.bundle).
gpu-tune:
	$(GPU_INSTALL)
	$(GPU_ENV) python3 -m rebased_kernels.gpu_check --out $(OUT) \
		--stages $(or $(STAGES),$(TUNE_STAGES)) --asv-backends $(ASV_BACKENDS) \
		$(if $(TUNE_TOTAL),--tune-total $(TUNE_TOTAL)) \
		$(if $(TUNE_BACKENDS),--tune-backends $(TUNE_BACKENDS))

# The MQAR harness's H100 lines: reach 0.99, steps/s vs fla at L=2048, Table 1, IoU table.
gpu-mqar:
	$(GPU_INSTALL)
	$(GPU_ENV) python3 -m rebased_kernels.gpu_mqar --out $(OUT) \
		--stages $(or $(STAGES),$(MQAR_STAGES)) $(MQAR_ARGS)

# The LM harness's H100 line: ReBased vs Based (lm-30m, seq 2048, 12M tokens of the machine's
# standard library, byte-level), perplexity overall/AR/non-AR; tokens/s triton vs fla.
gpu-lm:
	$(GPU_INSTALL)
	$(GPU_ENV) python3 -m rebased_kernels.gpu_lm --out $(OUT) \
		--stages $(or $(STAGES),$(LM_STAGES)) $(LM_ARGS)

# Fail when any asv cell of HEAD is slower than BASE by more than FACTOR (asv's own
# `compare` exits 0). Both commits need results for MACHINE under asv_bench/results/.
BASE ?= HEAD~1
HEAD ?= HEAD
FACTOR ?= 1.10
MACHINE ?= cpu-2core
bench-compare: $(STAMP)
	$(PY) -m rebased_kernels.benchgate --factor $(FACTOR) \
		$$(ls asv_bench/results/$(MACHINE)/$$(git rev-parse --short=8 $(BASE))-*.json) \
		$$(ls asv_bench/results/$(MACHINE)/$$(git rev-parse --short=8 $(HEAD))-*.json)

clean:
	rm -rf $(VENV) build *.egg-info .hypothesis .pytest_cache .ruff_cache

# The asv HTML history of every machine's committed results (asv_bench/results/).
bench-html: $(STAMP)
	cd asv_bench && ../$(PY) -m asv publish --html-dir $(or $(HTML),html)
	@echo "written: $(or $(HTML),html)/index.html, relative to asv_bench/ (asv preview serves it)"
