#!/bin/bash
# Session 17, call 3 (~100 s, on call 2's warm machine): the parallel variant's graph-replay
# profile at 1k / 2k (call 2's profile stopped at a KeyError in the fallback, now mended).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
P='"variant":"parallel","chunk_size":64,"exact":"x2"'
$E timeout 90 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 1024,2048 --config "[{$P},{$P,\"num_warps\":8}]" > $OUT/p.log 2>&1
grep "^profile\|Error" $OUT/p.log | cut -c1-240
