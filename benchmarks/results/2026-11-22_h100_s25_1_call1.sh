#!/bin/bash
# s25 call 1: does keeping the socket loop awake (spinning in poll) shorten the light-load round trip on an H100 host?
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,pstate --format=csv > $OUT/r/gpu.txt 2>&1
python3 .s25/asm.py > $OUT/r/asm.txt 2>&1
python3 .s25/cold.py > $OUT/r/cold.txt 2>&1
B="--clients 256 --load-procs 6 --events 3000000 --duration 12 --event-size 1000 --client-mode req --think-ms exp:1000 --load-driver compiled"
run() { timeout 120 python3 .s25/turns.py --bench-args "$B" "$@" 2>&1 | grep -v Warning | tail -25 >> $OUT/r/turns.txt; }
run --engine null --tag n0
run --engine null --spin-us 20000 --tag n1
run --engine null --tag n0b
run --engine null --spin-us 20000 --tag n1b
run --engine cuda --lanes 2 --tag c0
run --engine cuda --lanes 2 --spin-us 20000 --tag c1
run --engine cuda --lanes 2 --tag c0b
run --engine cuda --lanes 2 --spin-us 20000 --tag c1b
run --engine null --timing --tag nt
run --engine cuda --lanes 2 --timing --tag ct
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,pstate --format=csv >> $OUT/r/gpu.txt 2>&1
cat $OUT/r/*.txt
