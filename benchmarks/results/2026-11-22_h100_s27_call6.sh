#!/bin/bash
# s27 call 6 (call 5's host while it is held): the 50x comparison, three rounds with kept servers.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
timeout 400 python3 -m charon.bench --spawn-server --events 3000000 --duration 8 --event-size 1000 --clients 256 --no-progress \
  --load-cpus 1-15 --load-nice 10 --client-mode dealer --in-flight 8 --load-driver compiled --load-procs 6 --compare-per-event \
  --rounds 3 --keep-servers --json $OUT/r/x50.json -- --engine cuda --detector demo --io-threads 2 --procs 7 --engine-cpus 0 \
  --engine-lanes 2 --max-batch-photons 1e5 --intake compiled > $OUT/r/x50.txt 2>&1
tail -12 $OUT/r/x50.txt
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/r/x50.json"))
for m, runs in d["rounds"].items():
    print(m, [(round(r["events_per_s"]), round(r["engine_busy_fraction"], 3), r["host_steal_ms"]) for r in runs])
print(d["speedup"])
PY
cd $OUT && tar czf s27_call6.tgz r && rm -rf r
