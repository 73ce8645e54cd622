#!/bin/bash
# s27 call 3: the host's own gaps. A: hiccups.py alone on every CPU (idle host). B (x2): light load with the
# server on 0-3 and the load on 4-11, hiccups.py watching 12-15 at the same time (traces to line up).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
(vmstat -t 1 > $OUT/r/vmstat.txt) & VM=$!
echo "=== $(date +%T) hiccups alone" >> $OUT/r/runs.txt
python3 benchmarks/hiccups.py --seconds 15 --json $OUT/r/hiccups_idle.json >> $OUT/r/runs.txt 2>&1
LIGHT="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
SRV="--engine cuda --detector demo --engine-lanes 2 --engine-driver loop"
for round in a b; do
  echo "=== $(date +%T) light loop with hiccups on 12-15, $round" >> $OUT/r/runs.txt
  python3 benchmarks/hiccups.py --cpus 12-15 --seconds 45 --json $OUT/r/hiccups_$round.json > $OUT/r/hiccups_$round.txt 2>&1 &
  H=$!
  timeout 150 python3 -m charon.bench --spawn-server $LIGHT --server-cpus 0-3 --load-cpus 4-11 \
    --json $OUT/r/light_$round.json --trace $OUT/r/light_$round.npz -- $SRV >> $OUT/r/runs.txt 2>&1
  wait $H
done
kill $VM
python3 - <<'PY'
import json, os
import numpy as np
out = os.environ["OUT"] + "/r"
print("idle:", json.load(open(out + "/hiccups_idle.json"))["summary"])
for rnd in "ab":
    r = json.load(open(f"{out}/light_{rnd}.json"))["batched"]
    h = json.load(open(f"{out}/hiccups_{rnd}.json"))
    t = np.load(f"{out}/light_{rnd}.npz")
    sent, rtt, w, u0 = t["batched_1_sent"], t["batched_1_rtt"], float(t["batched_1_window"]), float(t["batched_1_start_unix"])
    m = sent >= w
    slow = (rtt > 5e-3) & m
    first_sent = []  # each cluster's stall: from its earliest send to its last reply, unix s
    done = sent + rtt
    order = np.argsort(done[slow]); ds, ss = done[slow][order], sent[slow][order]
    cuts = np.where(np.diff(ds) > 0.02)[0] + 1
    clusters = [(u0 + s.min(), u0 + d.max()) for s, d in zip(np.split(ss, cuts), np.split(ds, cuts))] if ds.size else []
    gaps = [(s, g) for c in h["per_cpu"] for s, g in zip(c["gap_start_unix"], c["gap_s"]) if g > 2e-3]
    hit = sum(any(a - 0.005 <= s <= b for s, g in gaps) for a, b in clusters)
    span = (done.max() - w)
    cover = sum(b - a + 0.005 for a, b in clusters) / span
    print(f"light {rnd}: p50/p99 {r['latency_ms']['p50']:.2f}/{r['latency_ms']['p99']:.2f} bound {r['p99_bound_ms']:.2f} "
          f"clusters {len(clusters)}; meter gaps > 2 ms on 12-15: {len(gaps)}; clusters with a gap inside: {hit} "
          f"(chance ~{cover * len(gaps):.1f} gaps fall in them); steal {r['host_steal_ms']} ms; "
          f"server wait {r['server_wait_ms']:.1f} ms")
    print("   meter:", h["summary"])
PY
cd $OUT && tar czf s27_call3.tgz r && rm -rf r
