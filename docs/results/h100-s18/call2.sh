#!/bin/bash
# Session 18, call 2 (~150 s, on call 1's warm machine if it still is): the 16k profile
# session 16's call 1 held (graph replay, per-kernel times): tiles 64 x 4 x3 as is, with
# state_fused + state_chunk 64, with segment_half, with both, and exact x2. Carry .whl-gpu.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
F='"state_fused":true,"state_chunk":64'
$E timeout 130 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 16384 --config "[{$T4},{$T4,$F},{$T4,\"segment_half\":true},
    {$T4,$F,\"segment_half\":true},{$T4,\"exact\":\"x2\"}]" > $OUT/p.log 2>&1
grep "^profile\|^decode\|Error" $OUT/p.log | cut -c1-240; echo "[$((SECONDS-START)) s]"
