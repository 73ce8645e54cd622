#!/bin/bash
# s26 call 1: light-load A/B in one process (CUDA, two lanes), alternating, two rounds.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT/r
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/r/gpu.txt
(vmstat 1 > $OUT/r/vmstat.txt) & VM=$!
BA="--clients 256 --load-procs 6 --events 3000000 --duration 15 --event-size 1000 --client-mode req --think-ms exp:1000 --load-driver compiled"
for round in a b; do
  for v in "thread old 0.8" "thread new 0.8" "loop new 0.8" "loop new 0"; do
    set -- $v
    tag=${1}_${2}_${3}_$round
    echo "=== $(date +%T) $tag" >> $OUT/r/runs.txt
    timeout 120 python3 .s26/drive.py --engine cuda --lanes 2 --drive $1 --asm $2 --spin-frac $3 --tag $tag \
      --trace $OUT/r/$tag.npz --json-out $OUT/r/$tag.json --bench-args "$BA" >> $OUT/r/runs.txt 2>&1
  done
done
kill $VM
grep -v "^  post\|^  roundtrip" $OUT/r/runs.txt | tail -c 9000
cd $OUT && tar czf s26_call1.tgz r && rm -rf r
