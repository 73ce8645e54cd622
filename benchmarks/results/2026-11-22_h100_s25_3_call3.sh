#!/bin/bash
# s25 call 3: light load through charon-bench --spawn-server (the new server_latency_ms), server pinned to few cores or not
mkdir -p $OUT/r
L="--spawn-server --events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
S="-- --engine cuda --detector demo --engine-lanes 2"
run() { tag=$1; shift; echo "=== $(date +%T) $tag $*" >> $OUT/r/runs.txt
  timeout 150 python3 -m charon.bench $L --json $OUT/r/$tag.json "$@" $S 2>&1 | grep -v Warning | tail -6 >> $OUT/r/runs.txt; }
for round in a b; do
  run free_$round --load-cpus 0-15
  run pin2_$round --server-cpus 0-1 --load-cpus 2-15
  run pin4_$round --server-cpus 0-3 --load-cpus 4-15
done
python3 - <<'PY' >> $OUT/r/runs.txt
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/r/*.json")):
    r = json.load(open(f))["batched"]; s = r.get("server_latency_ms") or {}
    print(f"{os.path.basename(f):14s} ev/s {r['events_per_s']:.0f} p50/p95/p99 {r['latency_ms']['p50']:.2f}/{r['latency_ms']['p95']:.2f}/{r['latency_ms']['p99']:.2f} "
          f"bound {r.get('p99_bound_ms', 0):.2f} within {r.get('p99_within_bound')} srv p50/p99 {s.get('p50', 0):.2f}/{s.get('p99', 0):.2f} "
          f"srv mean {r.get('server_latency_ms_mean') or 0:.2f} host_us {r.get('host_us_per_event', 0):.0f} over3 {r['latency_share_over_ms']['3']:.4f}/{r['server_latency_share_over_ms']['3']:.4f} "
          f"by_s {r['latency_p99_ms_by_second']}")
PY
cat $OUT/r/runs.txt | tail -8
