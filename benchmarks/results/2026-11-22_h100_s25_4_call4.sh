#!/bin/bash
# s25 call 4: the transport floor (an echo ROUTER) against charon with the null engine and with CUDA, same light load
mkdir -p $OUT/r
B="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
for round in a b; do
  python3 .s25/echo.py 40 > /tmp/echo_addr.txt 2>&1 & EP=$!; sleep 2; A=$(head -1 /tmp/echo_addr.txt)
  echo "=== $(date +%T) echo_$round $A" >> $OUT/r/runs.txt
  timeout 60 python3 -m charon.bench --address $A $B --json $OUT/r/echo_$round.json 2>&1 | grep -v Warning | tail -3 >> $OUT/r/runs.txt
  kill $EP; wait $EP 2>/dev/null
  echo "=== $(date +%T) null_$round" >> $OUT/r/runs.txt
  timeout 120 python3 .s25/turns.py --engine null --tag null_$round --json-out $OUT/r/null_$round.json --bench-args "$B" 2>&1 | grep -v Warning | tail -2 >> $OUT/r/runs.txt
  echo "=== $(date +%T) cuda_$round" >> $OUT/r/runs.txt
  timeout 150 python3 -m charon.bench --spawn-server $B --json $OUT/r/cuda_$round.json -- --engine cuda --detector demo --engine-lanes 2 2>&1 | grep -v Warning | tail -4 >> $OUT/r/runs.txt
done
python3 - <<'PY' >> $OUT/r/runs.txt
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/r/*.json")):
    r = json.load(open(f))["batched"]; s = r.get("server_latency_ms") or {}
    print(f"{os.path.basename(f):14s} ev/s {r['events_per_s']:.0f} failed {r['failed']} p50/p95/p99 {r['latency_ms']['p50']:.2f}/{r['latency_ms']['p95']:.2f}/{r['latency_ms']['p99']:.2f} "
          f"bound {r.get('p99_bound_ms', 0):.2f} srv p50/p99 {s.get('p50') or 0:.2f}/{s.get('p99') or 0:.2f} srv mean {r.get('server_latency_ms_mean') or 0:.2f} "
          f"host_us {r.get('host_us_per_event', 0):.0f} by_s {r['latency_p99_ms_by_second']}")
PY
tail -6 $OUT/r/runs.txt
