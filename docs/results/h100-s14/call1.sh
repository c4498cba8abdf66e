#!/bin/bash
# Session 14, call 1, most important first (a timeout keeps what is under $OUT): the bf16x3
# GPU twins, the stage / exact profile at 16k and 2k, the property suite narrowed to bf16x3,
# side-by-side timings, 2k profiles of longer segments. From the repo root, OUT set, .whl-gpu
# carried.
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv > $OUT/gpu.txt
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
$E $G python3 -m pytest -q -rf -p no:cacheprovider -n 8 tests/test_triton.py \
  -k "bf16x3 or pipelining or reject_bad" > $OUT/twins.txt 2>&1; tail -3 $OUT/twins.txt
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4'
S1='"num_stages":1,"state_stages":1'
$E python3 -m rebased_kernels.gpu_check --out $OUT/a --stages profile --config \
  "[{$T4,\"exact\":\"x3\"},{$T4,\"exact\":\"x3\",$S1},{$T4,\"exact\":\"bf16x3\",$S1}]" \
  > $OUT/a.log 2>&1; grep "^profile\|^decode" $OUT/a.log | cut -c1-200
$E $G REBASED_KERNELS_TEST_CONFIG='{"exact": "bf16x3"}' timeout -s INT 100 python3 -m pytest \
  -q -rf -p no:cacheprovider -n 8 tests/test_properties.py -k triton > $OUT/props-b3.txt 2>&1
tail -3 $OUT/props-b3.txt
$E python3 -m rebased_kernels.gpu_check --out $OUT/b --stages timings --Ts 2048,16384,32768 \
  --config "{$T4,\"exact\":\"bf16x3\",$S1}" > $OUT/b.log 2>&1; tail -4 $OUT/b.log
C='"variant":"tiles","chunk_size":64,"exact":"bf16x3",'"$S1"
$E python3 -m rebased_kernels.gpu_check --out $OUT/c --stages profile --profile-Ts 2048 --config \
  "[{$C,\"chunks_per_segment\":8},{$C,\"chunks_per_segment\":32}]" > $OUT/c.log 2>&1
grep "^profile" $OUT/c.log | cut -c1-200
