#!/bin/bash
# s24 call 4: the target's comparison (batched against one event per call) on one host, with kept servers:
# DEALER in-flight 8 at a 1e5 cap, three alternating rounds (calls 1 and 3 again, on a third host).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
cp "$0" $R/call4.sh
nvidia-smi -L > $R/gpu.txt; date -u >> $R/gpu.txt
for v in if8_1e5:8:1e5; do
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
tar czf $OUT/s24_4.tgz -C $R .
