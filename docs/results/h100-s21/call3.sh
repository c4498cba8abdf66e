#!/bin/bash
# Session 21 call 3 (~300 s; carry .whl-gpu): round 3 of debug_tiles.py after the dq mend (errors per
# output: rebased bf16 and fp32, based bf16; fwd and fwd+bwd at 16k, walk and tiles-256).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
$E timeout 270 python3 docs/results/h100-s21/debug_tiles.py $OUT 3 > $OUT/debug.log 2>&1
grep -v "TileLang" $OUT/debug.log | cut -c1-900 | tail -40
