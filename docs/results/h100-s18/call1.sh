#!/bin/bash
# Session 18, call 1 (~540 s; carry .whl-gpu): (a) triton `parallel` with the forward loop
# masking only the diagonal block: its GPU tests (tests/test_triton_parallel.py, the property
# suite narrowed to it) and its graph-replay profile at 1k / 2k beside tiles 64 x 4 x3;
# (b) session 16's call 1 without the 16k profile: TileLang's split timed beside triton
# (split_vs_whole), then the TileLang property suite (a segment-48 split drawn).
START=$SECONDS
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
G="REBASED_KERNELS_PROFILE=gpu REBASED_KERNELS_TEST_DEVICE=cuda"
T4='"variant":"tiles","chunk_size":64,"chunks_per_segment":4,"exact":"x3"'
P='"variant":"parallel","chunk_size":64,"exact":"x2"'
echo "[install $((SECONDS-START)) s]"
$E $G REBASED_KERNELS_TEST_CONFIG='{"variant":"parallel"}' timeout -s INT 150 \
  python3 -m pytest -q -rf -p no:cacheprovider -n 8 tests/test_triton_parallel.py \
  tests/test_properties.py -k "triton or parallel" > $OUT/par_props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/par_props.txt | tail -8; echo "[$((SECONDS-START)) s]"
$E timeout 70 python3 -m rebased_kernels.gpu_check --out $OUT/p --stages profile \
  --profile-Ts 1024,2048 --config "[{$T4},{$P}]" > $OUT/p.log 2>&1
grep "^profile\|Error" $OUT/p.log | cut -c1-240; echo "[$((SECONDS-START)) s]"
$E timeout 170 python3 -m rebased_kernels.gpu_check --out $OUT/tl --stages tilelang \
  --tilelang-dtypes none --config "{$T4}" > $OUT/tl.log 2>&1
grep "^tilelang\|Error" $OUT/tl.log | cut -c1-900; echo "[$((SECONDS-START)) s]"
LEFT=$((${CAP:-530} - (SECONDS - START)))  # CAP: the seconds this call may take
[ $LEFT -gt 40 ] && $E $G timeout -s INT $LEFT python3 -m pytest -q -rf -p no:cacheprovider \
  -n 4 tests/test_properties.py tests/test_triton.py -k "tilelang or split_runs or refuses_bf" \
  > $OUT/tl_props.txt 2>&1
grep -E "^FAILED|passed|failed" $OUT/tl_props.txt | tail -15; echo "[$((SECONDS-START)) s]"
