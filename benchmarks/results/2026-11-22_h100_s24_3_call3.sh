#!/bin/bash
# s24 call 3: the target's comparison (batched against one event per call) on one host, with kept servers:
# DEALER in-flight 8 at a 1e5 cap, then in-flight 4 at 7e4, three alternating rounds each (call 1 again, on
# another host); then three light-load runs with the shares over 3 ms; then the GPU tests.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
cp "$0" $R/call3.sh
nvidia-smi -L > $R/gpu.txt; date -u >> $R/gpu.txt
for v in if8_1e5:8:1e5 if4_7e4:4:7e4; do
  IFS=: read label k cap <<< "$v"
  t0=$(date +%s)
  timeout 280 python3 -m charon.bench --spawn-server --events 3000000 --duration 8 --event-size 1000 --clients 256 \
    --no-progress --load-cpus 1-15 --load-nice 10 --client-mode dealer --in-flight $k --load-driver compiled \
    --load-procs 6 --compare-per-event --rounds 3 --keep-servers --json $R/${label}.json -- --engine cuda \
    --detector demo --io-threads 2 --procs 7 --engine-cpus 0 --engine-lanes 2 --max-batch-photons $cap \
    --intake compiled > $R/${label}.log 2>&1 || echo "run $label failed: $(tail -3 $R/${label}.log)"
  echo "$label done in $(( $(date +%s) - t0 )) s" | tee -a $R/gpu.txt
  tail -12 $R/${label}.log
done
python3 - $R <<'PY' | tee $R/table.txt
import glob, json, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(p))
    print(os.path.basename(p), "speedup", d.get("speedup"))
    for mode, runs in d.get("rounds", {}).items():
        for r in runs:
            print(" ", mode, r["server"], round(r["events_per_s"]), r["latency_ms"], r.get("engine_busy_fraction"),
                  r.get("engine_compute_fraction"), r["batch_photons"], r.get("p99_bound_ms"))
PY
for r in a b c; do
  timeout 120 python3 -m charon.bench --spawn-server --events 3000000 --duration 20 --event-size 1000 --clients 256 \
    --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --json $R/light_$r.json -- \
    --engine cuda --detector demo --engine-lanes 2 > $R/light_$r.log 2>&1 || echo "light $r failed: $(tail -3 $R/light_$r.log)"
  echo "light $r done $(date +%T)"
done
python3 - $R <<'PY' > $R/light.txt
import glob, json, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "light_*.json"))):
    b = json.load(open(p))["batched"]
    L = b["latency_ms"]
    print(f"{os.path.basename(p)[:-5]} ev/s {b['events_per_s']:.0f} n {b['events']} p50 {L['p50']:.2f} p95 {L['p95']:.2f} "
          f"p99 {L['p99']:.2f} bound {b.get('p99_bound_ms', 0):.2f} srv_mean {b.get('server_latency_ms_mean'):.2f} "
          f"clients_over {b['latency_share_over_ms']} server_over {b['server_latency_share_over_ms']} "
          f"by_s {[round(x, 1) for x in b['latency_p99_ms_by_second']]}")
PY
cat $R/light.txt
CHARON_TEST_REAL_GPU=1 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine_service.py > $R/gpu_tests.log 2>&1; echo "gpu tests rc $?" | tee -a $R/gpu.txt; tail -3 $R/gpu_tests.log
tar czf $OUT/s24_3.tgz -C $R .
