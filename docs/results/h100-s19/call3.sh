#!/bin/bash
# Session 19 call 3 (~450 s; carry .whl-gpu): the TileLang property suite in one process after
# the two mends of call 2's failures (split operands packed at n = 1 < B; carried-state sweeps
# multiply by the state in tf32x3), beside the triton property suite on 4 workers (call 1
# finished 10 of its 18 tests, none failed, before its cut).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
$E $G timeout -s INT ${CAP:-420} python3 -m pytest -v -rf -p no:cacheprovider \
  tests/test_properties.py -k "tilelang" > $OUT/tl_props.txt 2>&1 &
tl=$!
$E $G timeout -s INT ${CAP:-420} python3 -m pytest -v -rf -p no:cacheprovider -n 4 \
  tests/test_properties.py -k "triton" > $OUT/props.txt 2>&1
wait $tl
grep -E "PASSED|FAILED|passed|failed" $OUT/tl_props.txt | tail -22
grep -E "PASSED|FAILED|passed|failed" $OUT/props.txt | tail -22
