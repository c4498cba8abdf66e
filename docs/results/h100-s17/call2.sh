#!/bin/bash
# Session 17, call 2 (after s16/call1.sh on the same warm machine): triton tiles 64 x 4 x3
# timed beside fla and SDPA at 2k / 16k / 32k, then the triton property suite (gpu profile,
# 12 workers) in the time left, ending by ~480 s. Carry .whl-gpu.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
$E timeout 100 python3 -m rebased_kernels.gpu_check --out $OUT/t --stages timings \
  --Ts 2048,16384,32768 --config "{$T4}" > $OUT/t.log 2>&1
grep -A4 "timings$" $OUT/t.log; echo "[$((SECONDS-START)) s]"
LEFT=$((470 - (SECONDS - START)))
[ $LEFT -gt 40 ] && $E $G timeout -s INT $LEFT python3 -m pytest -q -rf -p no:cacheprovider \
  -n 12 tests/test_properties.py tests/test_triton.py -k "triton or split_runs or refuses_bf" \
  > $OUT/props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/props.txt | tail -15; echo "[$((SECONDS-START)) s]"
