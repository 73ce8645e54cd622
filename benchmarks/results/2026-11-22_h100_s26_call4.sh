#!/bin/bash
# s26 call 4: GPU tests; --engine-driver loop against thread at light load (charon-bench --spawn-server, 3 rounds,
# alternating) and one process at saturation.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
(vmstat 1 > $OUT/r/vmstat.txt) & VM=$!
LIGHT="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
for round in a b c; do
  for drv in thread loop; do
    echo "=== $(date +%T) light $drv $round" >> $OUT/r/runs.txt
    timeout 150 python3 -m charon.bench --spawn-server $LIGHT --json $OUT/r/light_${drv}_$round.json -- \
      --engine cuda --detector demo --engine-lanes 2 --engine-driver $drv >> $OUT/r/runs.txt 2>&1
  done
done
kill $VM
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"] + "/r"
for f in sorted(glob.glob(out + "/*.json")):
    r = json.load(open(f))["batched"]
    l, s = r["latency_ms"], r.get("server_latency_ms") or {}
    print(f"{os.path.basename(f):22s} ev/s {r['events_per_s']:8.0f} p50/p95/p99 {l['p50']:.2f}/{l['p95']:.2f}/{l['p99']:.2f} "
          f"bound {r.get('p99_bound_ms', 0):.2f} within {r.get('p99_within_bound')} srv p50/p99 {s.get('p50', 0):.2f}/{s.get('p99', 0):.2f} "
          f"batch_ms {1e3*(r.get('batch_seconds_mean') or 0):.3f} busy {r.get('engine_busy_fraction') or 0:.2f} "
          f"host_us/ev {r.get('host_us_per_event') or 0:.0f} mean_batch {(r.get('batch_photons') or {}).get('mean', 0):.0f}")
PY
cd $OUT && tar czf s26_call4.tgz r && rm -rf r
