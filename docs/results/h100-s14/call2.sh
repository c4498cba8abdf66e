#!/bin/bash
# Session 14, call 2: which bf16x3 configurations run (each in its own process, all at once),
# memcheck of the one that crashed in call 1, then the first bf16x3 configuration that ran,
# profiled at 16k beside x3 at one stage (and the decode steps).
make gpu-install WHEELS=.whl-gpu OUT=$OUT > $OUT/install.log 2>&1
E="env -u PYTHONDONTWRITEBYTECODE PYTHONPATH=/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache"
T64='"variant":"tiles","chunk_size":64,"chunks_per_segment":4'
T32='"variant":"tiles","chunk_size":32,"chunks_per_segment":4'
S1='"num_stages":1,"state_stages":1'
B3='"exact":"bf16x3"'
( $E timeout 200 compute-sanitizer --tool memcheck --print-limit 12 python3 -m \
  rebased_kernels.gpu_ncu probe --config "{$T64,$B3,$S1}" --T 512 --part fwd_bwd \
  > $OUT/sanitizer.txt 2>&1 ) &
$E python3 -m rebased_kernels.gpu_check --out $OUT/p --stages probe --profile-Ts 2048 --config \
  "[{$T64,$B3,$S1},{$T64,$B3},{$T64,$B3,\"num_stages\":2},{$T32,$B3,$S1},{$T32,$B3},
    {\"variant\":\"packed\",\"chunk_size\":32,\"chunks_per_segment\":16,$B3},{$T64,\"exact\":\"x3\",$S1},
    {\"variant\":\"tiles\",\"chunk_size\":64,\"chunks_per_segment\":32,$B3,$S1}]" > $OUT/p.log 2>&1
grep "^probe" $OUT/p.log | cut -c1-260
CFG=$(python3 -c "
import json; d = json.load(open('$OUT/p/gpu-check.json'))
ok = [r['config'] for r in d['probe'] if r['ok'] and r['part'] == 'fwd_bwd'
      and r['config'].get('exact') == 'bf16x3' and r['config']['chunks_per_segment'] == 4]
print(json.dumps(ok[0]) if ok else '')")
echo "timed: $CFG"
if [ -n "$CFG" ]; then
  $E python3 -m rebased_kernels.gpu_check --out $OUT/q --stages profile --profile-Ts 16384 \
    --config "[{$T64,\"exact\":\"x3\",$S1},$CFG]" > $OUT/q.log 2>&1
  grep "^profile\|^decode" $OUT/q.log | cut -c1-260
fi
wait; grep -m3 "Invalid\|at packed\|ERROR SUMMARY" $OUT/sanitizer.txt
