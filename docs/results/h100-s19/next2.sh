#!/bin/bash
# Prepared in session 19 (~300 s; carry .whl-gpu): the one-pass dq tile kernel (dq_onepass)
# on the GPU: its tests (GPU twins of the interpreter's), then the 16k and 2k profiles of
# tiles 64 x 4 x2 with and without it, and with state_fused + segment_half as well.
# Expected (ptxas, triton 3.6, CPU): the dq tile kernel's pair loop does ~half the tensor-core
# work (one pass: scores x3, dO v^T in one tf32 product, two [64,64]x[64,16] x3 products,
# against two passes' scores twice, A W and P in x2, G y' x3), stack 576 -> 672 bytes a
# thread; x2's gradient tile kernels 4.41 ms at 16k (session 18) -> ~3.3-3.8 ms, forward +
# backward 5.79 -> ~4.8-5.2 ms.
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
$E $G timeout -s INT 100 python3 -m pytest -q -rf -p no:cacheprovider -n 4 tests/test_triton.py \
  -k "one_pass" > $OUT/onepass_tests.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/onepass_tests.txt | tail -6; echo "[$((SECONDS-START)) s]"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x2"'
F='"state_fused":true,"state_chunk":64,"segment_half":true'
$E timeout 150 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 2048,16384 --config "[{$T4},{$T4,\"dq_onepass\":true},
    {$T4,$F,\"dq_onepass\":true}]" > $OUT/p.log 2>&1
grep "^profile\|^decode\|Error" $OUT/p.log | cut -c1-240; echo "[$((SECONDS-START)) s]"
