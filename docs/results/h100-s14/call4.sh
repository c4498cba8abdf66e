#!/bin/bash
# Session 14, call 4 (what device time was left): the GPU twins of this session's mends:
# the bf16 split draw of call 3, the bf16x3 refusal, the pipelining tests with tiles' new
# default depth.
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
$E $G python3 -m pytest -q -rf -p no:cacheprovider -n 6 tests/test_triton.py \
  -k "split_run or handed or bf16x3 or pipelining" > $OUT/twins.txt 2>&1; tail -4 $OUT/twins.txt
