#!/bin/bash
# s27 call 1: light load, the load processes started together (gate) or as before (nogate: each starts once
# compiled), loop driver, alternating; then a kept loop server over 3 rounds (is the start-up transient the
# server's or the load's?). Every run with --trace.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/r /tmp/nogate
cp -r charon /tmp/nogate/ && sed -i 's/^                start.wait(START_TIMEOUT_S)/                pass/' /tmp/nogate/charon/bench.py
grep -c "start.wait(START_TIMEOUT_S)" /tmp/nogate/charon/bench.py charon/bench.py >> $OUT/r/runs.txt
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
(vmstat 1 > $OUT/r/vmstat.txt) & VM=$!
LIGHT="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
SRV="--engine cuda --detector demo --engine-lanes 2 --engine-driver loop"
for round in a b; do
  for start in gate nogate; do
    if [ $start = gate ]; then PP=/tmp/site:$PWD; else PP=/tmp/site:/tmp/nogate; fi
    echo "=== $(date +%T) light loop $start $round" >> $OUT/r/runs.txt
    PYTHONPATH=$PP timeout 150 python3 -m charon.bench --spawn-server $LIGHT --json $OUT/r/light_${start}_$round.json \
      --trace $OUT/r/light_${start}_$round.npz -- $SRV >> $OUT/r/runs.txt 2>&1
  done
done
echo "=== $(date +%T) kept loop server, gate, 3 rounds" >> $OUT/r/runs.txt
PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m charon.bench --spawn-server $LIGHT --rounds 3 --keep-servers \
  --json $OUT/r/kept.json --trace $OUT/r/kept.npz -- $SRV >> $OUT/r/runs.txt 2>&1
kill $VM
PYTHONPATH=/tmp/site:$PWD python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"] + "/r"
for f in sorted(glob.glob(out + "/*.json")):
    d = json.load(open(f))
    for r in d.get("rounds", {}).get("batched") or [d["batched"]]:
        l, s = r["latency_ms"], r.get("server_latency_ms") or {}
        print(f"{os.path.basename(f):22s} ev/s {r['events_per_s']:6.0f} p50/p95/p99 {l['p50']:.2f}/{l['p95']:.2f}/{l['p99']:.2f} "
              f"bound {r.get('p99_bound_ms', 0):.2f} within {r.get('p99_within_bound')} srv p50/p99 {s.get('p50', 0):.2f}/{s.get('p99', 0):.2f} "
              f"warm {r['warmup_s']:.2f} starts {max(r['load_starts_s']):.3f}")
        print("   by second:", r["latency_p99_ms_by_second"])
PY
cd $OUT && tar czf s27_call1.tgz r && rm -rf r
