#!/bin/bash
# s24 call 2: the latency bound at light load (256 REQ clients thinking exp:T ms, one process, two lanes):
# the Python load loop against the compiled one (with think times now), and the Python intake against the compiled.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
cp "$0" $R/call2.sh
nvidia-smi -L > $R/gpu.txt; date -u >> $R/gpu.txt
run() {  # label think driver intake
  timeout 120 python3 -m charon.bench --spawn-server --events 3000000 --duration 20 --event-size 1000 --clients 256 \
    --no-progress --load-procs 6 --client-mode req --think-ms exp:$2 --load-driver $3 --json $R/$1.json -- \
    --engine cuda --detector demo --engine-lanes 2 --intake $4 > $R/$1.log 2>&1 || echo "run $1 failed: $(tail -3 $R/$1.log)"
  echo "$1 done $(date +%T)"
}
for r in a b; do
  run e1000_py_py_$r 1000 python python
  run e1000_c_py_$r 1000 compiled python
  run e1000_c_c_$r 1000 compiled compiled
done
run e300_py_py 300 python python
run e300_c_c 300 compiled compiled
python3 - $R <<'PY' > $R/table.txt
import glob, json, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    b = json.load(open(p))["batched"]
    L = b["latency_ms"]
    print(f"{os.path.basename(p)[:-5]:16s} ev/s {b['events_per_s']:7.0f} n {b['events']:6d} p50 {L['p50']:.2f} p95 {L['p95']:.2f} "
          f"p99 {L['p99']:.2f} bound {b.get('p99_bound_ms', 0):.2f} batch_ms {1e3 * b.get('batch_seconds_mean', 0):.2f} "
          f"srv_mean {b.get('server_latency_ms_mean')} wait {b.get('dispatch_wait_ms_mean')} host_us {b.get('host_us_per_event')} "
          f"load_us {b.get('load_main_thread_us_per_event')} over10 {b.get('latency_share_over_ms')}")
PY
cat $R/table.txt
tar czf $OUT/s24_2.tgz -C $R .
