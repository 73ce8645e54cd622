#!/bin/bash
# s27 call 4 (the same host as call 3 if it is still held): light load, loop and thread drivers, free, and the
# loop driver with the server on 0-3 and the load on 4-15; two rounds, alternating.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
(vmstat -t 1 > $OUT/r/vmstat.txt) & VM=$!
LIGHT="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
for round in a b; do
  for v in loop thread loop_pinned; do
    P=""; D=${v%_pinned}
    if [ $v = loop_pinned ]; then P="--server-cpus 0-3 --load-cpus 4-15"; fi
    echo "=== $(date +%T) light $v $round" >> $OUT/r/runs.txt
    timeout 150 python3 -m charon.bench --spawn-server $LIGHT $P --json $OUT/r/light_${v}_$round.json \
      --trace $OUT/r/light_${v}_$round.npz -- --engine cuda --detector demo --engine-lanes 2 --engine-driver $D >> $OUT/r/runs.txt 2>&1
  done
done
kill $VM
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"] + "/r"
for f in sorted(glob.glob(out + "/*.json")):
    r = json.load(open(f))["batched"]
    l, s = r["latency_ms"], r.get("server_latency_ms") or {}
    print(f"{os.path.basename(f):26s} p50/p99 {l['p50']:.2f}/{l['p99']:.2f} bound {r['p99_bound_ms']:.2f} within {r['p99_within_bound']} "
          f"srv p50/p99 {s.get('p50', 0):.2f}/{s.get('p99', 0):.2f} steal {r['host_steal_ms']} srv wait {r['server_wait_ms']:.1f}")
    print("   by second:", r["latency_p99_ms_by_second"])
PY
cd $OUT && tar czf s27_call4.tgz r && rm -rf r
