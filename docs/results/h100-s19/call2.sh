#!/bin/bash
# Session 19 call 2 (prepared in session 18 as next2.sh; ~300 s; carry .whl-gpu): the TileLang property suite with a
# segment-48 split drawn, in ONE process (session 18 ran it on 4 pytest-xdist workers: each
# compiled every kernel itself and none finished a test in 243 s; session 12's one-process run
# passed in 203 s). If it passes: split.DEFAULT_SEGMENT = "auto" (forward+backward 1.3-1.5x
# faster at 8k-16k in session 18, the forward no faster).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
$E $G timeout -s INT ${CAP:-290} python3 -m pytest -v -rf -p no:cacheprovider \
  tests/test_properties.py -k "tilelang" > $OUT/tl_props.txt 2>&1
grep -E "PASSED|FAILED|SKIPPED|passed|failed" $OUT/tl_props.txt | tail -25
