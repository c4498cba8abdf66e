#!/bin/bash
# Session 20 call 2 (~480 s; carry .whl-gpu): TileLang's tile forward timed for the first time
# (gpu_check's tilelang stage: the walk at segments 0 / 512 / 2048 / auto and the tile forward
# at segments of 256 and 512, each checked against the unsplit walk, per-kernel tables at 16k),
# then session 19's next2.sh (triton's one-pass dq: GPU twins and 2k / 16k profiles).
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
$E timeout 300 python3 -m rebased_kernels.gpu_check --out $OUT/tl --stages tilelang \
  --tilelang-dtypes none --config "{$T4}" > $OUT/tl.log 2>&1
grep "^tilelang\|Error" $OUT/tl.log | cut -c1-1200; echo "[$((SECONDS-START)) s]"
mkdir -p $OUT/next2 && OUT=$OUT/next2 bash docs/results/h100-s19/next2.sh
echo "[$((SECONDS-START)) s]"
