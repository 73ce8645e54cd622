#!/usr/bin/env bash
# Alternating A/B runs of the issue-5 load on one host, so that host drift hits every variant alike.
#   benchmarks/ab_bench.sh OUTDIR ROUNDS "label=server flags" "label=server flags" ...
# Every run: 256 REQ clients, 1000-photon events, DURATION (8) s, the CUDA engine on demo with
# COMMON (--procs 7 --io-threads 2) plus the variant's flags. One JSON per run in OUTDIR
# (LABEL_ROUND.json); a table of all of them at the end (ROUNDS 0: only the table of OUTDIR).
# Columns: wait = a batch's oldest event's dispatch wait, trip = front end to engine and back,
# resid = inside the shared engine (means, ms).
set -uo pipefail
out=$1; rounds=$2; shift 2
mkdir -p "$out"
common=${COMMON:---engine cuda --detector demo --procs 7 --io-threads 2}
for ((r = 1; r <= rounds; r++)); do
    for v in "$@"; do
        label=${v%%=*}; flags=${v#*=}
        # shellcheck disable=SC2086  # flags are word lists on purpose
        python3 -m charon.bench --spawn-server --events 1000000 --duration "${DURATION:-8}" --event-size 1000 \
            --client-mode req --clients 256 --load-procs "${LOAD_PROCS:-6}" --no-progress \
            --json "$out/${label}_$r.json" -- $common $flags >"$out/${label}_$r.log" 2>&1 \
            || echo "run $label $r failed: $(tail -3 "$out/${label}_$r.log")"
    done
done
python3 - "$out" <<'EOF'
import glob, json, os, sys
print(f"{'run':<14}{'events/s':>10}{'p50':>7}{'p99':>7}{'busy':>6}{'batch':>8}{'wait':>6}{'trip':>6}{'resid':>6}")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    r = json.load(open(path))["batched"]
    f = lambda k: r.get(k) or 0.0
    print(f"{os.path.basename(path)[:-5]:<14}{r['events_per_s']:>10.0f}{r['latency_ms']['p50']:>7.1f}"
          f"{r['latency_ms']['p99']:>7.1f}{r['engine_busy_fraction']:>6.2f}{r['batch_photons']['mean']:>8.0f}"
          f"{f('dispatch_wait_ms_mean'):>6.2f}{f('engine_roundtrip_ms_mean'):>6.2f}{f('engine_residence_ms_mean'):>6.2f}")
EOF
