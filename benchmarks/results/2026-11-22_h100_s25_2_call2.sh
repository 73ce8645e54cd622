#!/bin/bash
# s25 call 2: where do the light-load stalls (server over 10 ms) arise? per-event trace + vmstat (steal time)
mkdir -p $OUT/r
B="--clients 256 --load-procs 6 --events 3000000 --duration 12 --event-size 1000 --client-mode req --think-ms exp:1000 --load-driver compiled"
(vmstat -t 1 > $OUT/r/vmstat.txt 2>&1 &) ; VM=$(pgrep -n vmstat)
grep -E "^cpu " /proc/stat > $OUT/r/stat.txt
nvidia-smi -q -d PERFORMANCE,CLOCK > $OUT/r/smi_before.txt 2>&1
run() { echo "=== $(date +%T) $*" >> $OUT/r/turns.txt; timeout 120 python3 .s25/turns.py --bench-args "$B" "$@" 2>&1 | grep -v Warning | tail -12 >> $OUT/r/turns.txt; }
run --engine cuda --lanes 2 --tag c2a --trace $OUT/r/c2a.npz --json-out $OUT/r/c2a.json
run --engine null --tag na --trace $OUT/r/na.npz --json-out $OUT/r/na.json
run --engine cuda --lanes 1 --tag c1a --trace $OUT/r/c1a.npz --json-out $OUT/r/c1a.json
run --engine cuda --lanes 2 --tag c2b --trace $OUT/r/c2b.npz --json-out $OUT/r/c2b.json
grep -E "^cpu " /proc/stat >> $OUT/r/stat.txt
nvidia-smi -q -d PERFORMANCE,CLOCK > $OUT/r/smi_after.txt 2>&1
kill $VM
cat $OUT/r/turns.txt $OUT/r/stat.txt
