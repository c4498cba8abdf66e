#!/bin/bash
# Session 19 call 1 (prepared in session 18 as next1.sh) (~420 s; carry .whl-gpu): the carried-state
# mend (packed_call.CARRIED_GRAD_SP) on the GPU: its GPU twin, then the triton property suite
# (gpu profile; draws with an initial state run the new tf32x3 sweeps), 8 workers.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
$E $G timeout -s INT 120 python3 -m pytest -q -rf -p no:cacheprovider -n 4 tests/test_triton.py \
  -k "session_18 or failed_on_a_gpu" > $OUT/twins.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/twins.txt | tail -6; echo "[$((SECONDS-START)) s]"
LEFT=$((${CAP:-410} - (SECONDS - START)))
$E $G timeout -s INT $LEFT python3 -m pytest -q -rf -p no:cacheprovider -n 8 \
  tests/test_properties.py -k "triton" > $OUT/props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/props.txt | tail -10; echo "[$((SECONDS-START)) s]"
