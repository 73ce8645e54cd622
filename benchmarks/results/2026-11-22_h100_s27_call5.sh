#!/bin/bash
# s27 call 5: real-GPU tests with --engine-driver auto the default; light load and saturation with the default
# driver (auto: the loop here) against --engine-driver thread.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
CHARON_TEST_REAL_GPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py tests/test_engine_service.py tests/test_known_answers.py > $OUT/r/gpu_tests.txt 2>&1
tail -3 $OUT/r/gpu_tests.txt
LIGHT="--events 3000000 --duration 15 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --think-ms exp:1000 --load-driver compiled"
SAT="--events 3000000 --duration 8 --event-size 1000 --clients 256 --no-progress --load-procs 6 --client-mode req --load-driver compiled"
for v in default thread default; do
  D=""; [ $v = thread ] && D="--engine-driver thread"
  echo "=== $(date +%T) light $v" >> $OUT/r/runs.txt
  timeout 150 python3 -m charon.bench --spawn-server $LIGHT --json $OUT/r/light_$v.$(date +%s).json -- --detector demo --engine-lanes 2 $D >> $OUT/r/runs.txt 2>&1
done
for v in default thread; do
  D=""; [ $v = thread ] && D="--engine-driver thread"
  echo "=== $(date +%T) saturated $v" >> $OUT/r/runs.txt
  timeout 150 python3 -m charon.bench --spawn-server $SAT --json $OUT/r/sat_$v.json -- --detector demo $D >> $OUT/r/runs.txt 2>&1
done
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"] + "/r"
for f in sorted(glob.glob(out + "/*.json")):
    r = json.load(open(f))["batched"]
    l, s = r["latency_ms"], r.get("server_latency_ms") or {}
    print(f"{os.path.basename(f):30s} ev/s {r['events_per_s']:7.0f} p50/p99 {l['p50']:.2f}/{l['p99']:.2f} bound {r['p99_bound_ms']:.2f} "
          f"within {r['p99_within_bound']} srv p50/p99 {s.get('p50', 0):.2f}/{s.get('p99', 0):.2f} steal {r['host_steal_ms']} "
          f"threads {sorted(r['server_threads'][0])}")
PY
cd $OUT && tar czf s27_call5.tgz r && rm -rf r
