#!/bin/bash
# s24 call 5: where the socket loop's ~400 us per event goes at light load (one process, CUDA engine).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/r; mkdir -p $R
cp "$0" $R/call5.sh
nvidia-smi -L > $R/gpu.txt; date -u >> $R/gpu.txt
B="--clients 256 --load-procs 6 --events 3000000 --duration 15 --event-size 1000 --client-mode req --think-ms exp:1000 --load-driver compiled"
for v in null:1:0 cuda:1:0 cuda:2:0 cuda:2:1; do
  IFS=: read eng lanes prof <<< "$v"
  P=""; [ "$prof" = 1 ] && P="--profile"
  timeout 150 python3 benchmarks/profile_server.py --engine $eng --engine-lanes $lanes $P --bench-args "$B --json $R/${eng}_${lanes}_${prof}.json" > $R/${eng}_${lanes}_${prof}.txt 2>&1
  head -1 $R/${eng}_${lanes}_${prof}.txt
done
python3 - $R <<'PY'
import glob, json, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    b = json.load(open(p))["batched"]
    L = b["latency_ms"]
    print(os.path.basename(p), round(b["events_per_s"]), {k: round(v, 2) for k, v in L.items()}, "host_us", round(b["host_us_per_event"]),
          "srv", round(b["server_latency_ms_mean"], 2), "bound", b.get("p99_bound_ms"), "batch", b["batch_photons"]["mean"],
          "wait", b.get("dispatch_wait_ms_mean"), "over3", b["latency_share_over_ms"]["3"], b["server_latency_share_over_ms"]["3"])
PY
sed -n 1,200p $R/cuda_2_1.txt | head -120
tar czf $OUT/s24_5.tgz -C $R .
