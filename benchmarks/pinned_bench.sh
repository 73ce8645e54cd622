#!/usr/bin/env bash
# Server and load generator on disjoint cores, as in production where the Geant4 clients run on
# other hosts: charon-batch pinned to SERVER_CPUS, charon-bench (its load processes) to LOAD_CPUS.
#   SERVER_CPUS=0-15 LOAD_CPUS=16-31 LOAD_PROCS=8 benchmarks/pinned_bench.sh OUT.json -- --engine cuda --procs 5
# The server's flags follow "--"; the load is 256 REQ clients of 1000-photon events for 10 s.
set -euo pipefail
out=$1; shift; [[ ${1:-} == "--" ]] && shift
port=${PORT:-5601}; mport=${METRICS_PORT:-9601}
n=1; prev=""; for a in "$@"; do [[ $prev == "--procs" ]] && n=$a; prev=$a; done
urls=""; k=$(( n > 1 ? n + 1 : 1 ))
for ((i = 0; i < k; i++)); do urls+="${urls:+,}http://127.0.0.1:$((mport + i))/metrics"; done
taskset -c "${SERVER_CPUS:-0-15}" python3 -m charon.cli --bind "tcp://127.0.0.1:$port" --metrics-port "$mport" \
    --log-level WARNING "$@" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
until python3 -c "import sys, urllib.request; [urllib.request.urlopen(u, timeout=2) for u in sys.argv[1].split(',')]" "$urls" 2>/dev/null; do
    kill -0 $server || exit 1; sleep 1
done
taskset -c "${LOAD_CPUS:-16-31}" python3 -m charon.bench --address "tcp://127.0.0.1:$port" --metrics-url "$urls" \
    --clients "${CLIENTS:-256}" --client-mode req --load-procs "${LOAD_PROCS:-8}" --events 1000000 \
    --duration "${DURATION:-10}" --event-size 1000 --no-progress --json "$out" | tail -1
