#!/bin/bash
# The first call of the next session (session 15 got no machine: ~13 failed starts). In one
# call, ending by ~570 s: TileLang's split sequences timed beside triton (2k / 8k / 16k,
# segment 0 / 512 / 2048 / auto), the profile of the CPU-prepared triton keys (state_fused,
# segment_half, x2) beside tiles 64 x 4 x3 at 16k, side-by-side timings at 2k / 16k / 32k,
# then the triton property suite (gpu profile) in the time left. Carry .whl-gpu.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
F='"state_fused":true,"state_chunk":64'
$E timeout 170 python3 -m rebased_kernels.gpu_check --out $OUT/tl --stages tilelang \
  --tilelang-dtypes none --config "{$T4}" > $OUT/tl.log 2>&1
grep "^tilelang\|Error" $OUT/tl.log | cut -c1-400; echo "[$((SECONDS-START)) s]"
$E timeout 120 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 16384 --config "[{$T4},{$T4,$F},{$T4,\"segment_half\":true},
    {$T4,$F,\"segment_half\":true},{$T4,\"exact\":\"x2\"}]" > $OUT/p.log 2>&1
grep "^profile\|^decode\|Error" $OUT/p.log | cut -c1-240; echo "[$((SECONDS-START)) s]"
$E timeout 90 python3 -m rebased_kernels.gpu_check --out $OUT/t --stages timings \
  --Ts 2048,16384,32768 --config "{$T4}" > $OUT/t.log 2>&1
grep -A4 "timings$" $OUT/t.log; echo "[$((SECONDS-START)) s]"
LEFT=$((565 - (SECONDS - START)))
[ $LEFT -gt 40 ] && $E $G timeout -s INT $LEFT python3 -m pytest -q -rf -p no:cacheprovider \
  -n 12 tests/test_properties.py tests/test_triton.py -k "triton or split_runs or refuses_bf" \
  > $OUT/props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/props.txt | tail -15; echo "[$((SECONDS-START)) s]"
