#!/bin/bash
# Session 17, call 2: triton's new `parallel` variant (quadratic, no state) beside tiles
# 64 x 4 x3 at 1k / 2k / 4k (profile: graph replay, per-kernel times), timed beside fla and
# SDPA at 1k / 2k / 4k, then its GPU tests (tests/test_triton_parallel.py and the property
# suite narrowed to it: bf16, fp16, fp32) in the time left, ending by ~400 s. Carry .whl-gpu.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
P='"variant":"parallel"'
$E timeout 120 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 1024,2048,4096 --config "[{$T4},{$P,\"chunk_size\":64,\"exact\":\"x2\"},
    {$P,\"chunk_size\":32,\"exact\":\"x3\"}]" > $OUT/p.log 2>&1
grep "^profile\|Error" $OUT/p.log | cut -c1-240; echo "[$((SECONDS-START)) s]"
$E timeout 80 python3 -m rebased_kernels.gpu_check --out $OUT/t --stages timings \
  --Ts 1024,2048,4096 --config "{$P,\"chunk_size\":64,\"exact\":\"x2\"}" > $OUT/t.log 2>&1
grep -A4 "timings$" $OUT/t.log; grep "^{" $OUT/t.log | cut -c1-400; echo "[$((SECONDS-START)) s]"
LEFT=$((400 - (SECONDS - START)))
[ $LEFT -gt 40 ] && $E $G REBASED_KERNELS_TEST_CONFIG="{$P}" timeout -s INT $LEFT \
  python3 -m pytest -q -rf -p no:cacheprovider -n 8 tests/test_triton_parallel.py \
  tests/test_properties.py -k "triton or parallel" > $OUT/props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/props.txt | tail -15; echo "[$((SECONDS-START)) s]"
