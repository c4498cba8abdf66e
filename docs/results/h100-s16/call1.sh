#!/bin/bash
# Session 16, call 1 (session 15's call 1 cut to ~490 s: five failed starts left 884 s of
# device time): TileLang's split timed beside triton, each split's o and gradients against
# the unsplit walk's (split_vs_whole); the profile of state_fused / segment_half / x2 at 16k;
# then the TileLang property suite (a segment-48 split drawn) and triton's two new GPU tests
# in what is left. Carry .whl-gpu.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
F='"state_fused":true,"state_chunk":64'
$E timeout 190 python3 -m rebased_kernels.gpu_check --out $OUT/tl --stages tilelang \
  --tilelang-dtypes none --config "{$T4}" > $OUT/tl.log 2>&1
grep "^tilelang\|Error" $OUT/tl.log | cut -c1-900; echo "[$((SECONDS-START)) s]"
$E timeout 110 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 16384 --config "[{$T4},{$T4,$F},{$T4,\"segment_half\":true},
    {$T4,$F,\"segment_half\":true},{$T4,\"exact\":\"x2\"}]" > $OUT/p.log 2>&1
grep "^profile\|^decode\|Error" $OUT/p.log | cut -c1-240; echo "[$((SECONDS-START)) s]"
LEFT=$((480 - (SECONDS - START)))
[ $LEFT -gt 40 ] && $E $G timeout -s INT $LEFT python3 -m pytest -q -rf -p no:cacheprovider \
  tests/test_properties.py tests/test_triton.py -k "tilelang or split_runs or refuses_bf" \
  > $OUT/props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/props.txt | tail -15; echo "[$((SECONDS-START)) s]"
