#!/bin/bash
# s27 call 2: light load, loop driver; free (as call 1) against the server on cores 0-3 and the load on 4-15,
# alternating; with the threads' waits for a CPU, steal, traces and vmstat -t.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
nproc >> $OUT/r/gpu.txt
(vmstat -t 1 > $OUT/r/vmstat.txt) & VM=$!
LIGHT="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
SRV="--engine cuda --detector demo --engine-lanes 2 --engine-driver loop"
for round in a b; do
  for pin in free pinned; do
    if [ $pin = pinned ]; then P="--server-cpus 0-3 --load-cpus 4-15"; else P=""; fi
    echo "=== $(date +%T) light loop $pin $round" >> $OUT/r/runs.txt
    timeout 150 python3 -m charon.bench --spawn-server $LIGHT $P --json $OUT/r/light_${pin}_$round.json \
      --trace $OUT/r/light_${pin}_$round.npz -- $SRV >> $OUT/r/runs.txt 2>&1
  done
done
kill $VM
python3 - <<'PY'
import json, glob, os
import numpy as np
out = os.environ["OUT"] + "/r"
for f in sorted(glob.glob(out + "/*.json")):
    r = json.load(open(f))["batched"]
    l, s = r["latency_ms"], r.get("server_latency_ms") or {}
    t = np.load(f[:-5] + ".npz")
    sent, rtt, w = t["batched_1_sent"], t["batched_1_rtt"] * 1e3, float(t["batched_1_window"])
    m = sent >= w
    slow = (rtt > 5) & m
    done = sent + rtt / 1e3
    ts = np.sort(done[slow]); cl = np.split(ts, np.where(np.diff(ts) > 0.02)[0] + 1) if ts.size else []
    stall_ms = sum((c[-1] - c[0]) * 1e3 + 5 for c in cl)
    th = r["server_threads"][0]
    print(f"{os.path.basename(f):22s} p50/p99 {l['p50']:.2f}/{l['p99']:.2f} bound {r['p99_bound_ms']:.2f} srv p50/p99 {s.get('p50', 0):.2f}/{s.get('p99', 0):.2f} "
          f"slow {slow.sum()} in {len(cl)} clusters (~{stall_ms:.0f} ms) steal {r['host_steal_ms']} load wait {r['load_wait_ms']:.0f} ms")
    print("   server threads:", {k: (round(v['cpu_ms']), round(v['wait_ms'], 1)) for k, v in th.items()})
    print("   by second:", r["latency_p99_ms_by_second"])
PY
cd $OUT && tar czf s27_call2.tgz r && rm -rf r
