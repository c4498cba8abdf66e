#!/bin/bash
# Session 21 call 2 (~300 s; carry .whl-gpu): debug_tiles.py (the tile kernels' errors per
# output, segment, stages, dtype; forward times at 16k).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
$E timeout 500 python3 docs/results/h100-s21/debug_tiles.py $OUT ${ROUND:-1} > $OUT/debug.log 2>&1
grep -v "TileLang" $OUT/debug.log | cut -c1-900 | tail -40
