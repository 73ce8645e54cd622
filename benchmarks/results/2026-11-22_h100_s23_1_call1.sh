#!/bin/bash
# s23 call 1: DEALER in-flight 4 against 8 (and 8 with a 1e5 cap), alternating, three rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
nvidia-smi -L > $R/gpu.txt; date -u >> $R/gpu.txt
for r in 1 2 3; do
  for v in if4_7e4:4:7e4 if8_7e4:8:7e4 if8_1e5:8:1e5; do
    IFS=: read label k cap <<< "$v"
    timeout 150 python3 -m charon.bench --spawn-server --events 3000000 --duration 8 --event-size 1000 --clients 256 \
      --no-progress --load-cpus 1-15 --load-nice 10 --client-mode dealer --in-flight $k --load-driver compiled \
      --load-procs 6 --json $R/${label}_$r.json -- --engine cuda --detector demo --io-threads 2 --procs 7 \
      --engine-cpus 0 --engine-lanes 2 --max-batch-photons $cap --intake compiled > $R/${label}_$r.log 2>&1 \
      || echo "run $label $r failed: $(tail -3 $R/${label}_$r.log)"
    echo "$label $r done $(date +%T)"
  done
done
python3 - $R <<'PY' | tee $R/table.txt
import glob, json, os, sys
from charon.bench import results_table
runs = {os.path.basename(p)[:-5]: json.load(open(p))["batched"] for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))}
print(results_table(runs))
for k, b in runs.items():
    print(k, round(b["events_per_s"]), b["latency_ms"], b.get("engine_busy_fraction"), b.get("engine_compute_fraction"), b["batch_photons"])
PY
tar czf $OUT/s23_1.tgz -C $R .
