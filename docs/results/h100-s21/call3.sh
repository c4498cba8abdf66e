#!/bin/bash
# Session 21 call 3 (~330 s; carry .whl-gpu): ROUND=2 debug_tiles.py after the dq mend (errors per
# output for rebased, based, norm_x2 in bf16, fp16, fp32; fwd and fwd+bwd times at 16k).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
$E timeout 500 python3 docs/results/h100-s21/debug_tiles.py $OUT 2 > $OUT/debug.log 2>&1
grep -v "TileLang" $OUT/debug.log | cut -c1-900 | tail -40
