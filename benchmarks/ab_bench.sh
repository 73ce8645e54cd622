#!/usr/bin/env bash
# Alternating A/B runs of the issue-5 load on one host, so that host drift hits every variant alike.
#   benchmarks/ab_bench.sh OUTDIR ROUNDS "label=server flags" "label=server flags" ...
# Every run: 1000-photon events, DURATION (8) s, LOAD (default: 256 REQ clients, --load-procs LOAD_PROCS, 6)
# against the CUDA engine on demo with COMMON (--procs 7 --io-threads 2) plus the variant's flags. One JSON
# per run in OUTDIR (LABEL_ROUND.json); charon-bench's table of them all at the end (ROUNDS 0: only that table).
# E.g. LOAD="--client-mode dealer --in-flight 4 --clients 256 --load-procs 6 --load-driver compiled".
set -uo pipefail
out=$1; rounds=$2; shift 2
mkdir -p "$out"
common=${COMMON:---engine cuda --detector demo --procs 7 --io-threads 2}
load=${LOAD:---client-mode req --clients 256 --load-procs ${LOAD_PROCS:-6}}
for ((r = 1; r <= rounds; r++)); do
    for v in "$@"; do
        label=${v%%=*}; flags=${v#*=}
        # shellcheck disable=SC2086  # flags are word lists on purpose
        python3 -m charon.bench --spawn-server --events 3000000 --duration "${DURATION:-8}" --event-size 1000 \
            $load --no-progress --json "$out/${label}_$r.json" -- $common $flags >"$out/${label}_$r.log" 2>&1 \
            || echo "run $label $r failed: $(tail -3 "$out/${label}_$r.log")"
    done
done
python3 - "$out" <<'EOF'
import glob, json, os, sys

from charon.bench import results_table

runs = {os.path.basename(p)[:-5]: json.load(open(p))["batched"]
        for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))}
print(results_table(runs))
EOF
