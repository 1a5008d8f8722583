#!/usr/bin/env bash
# Regenerates docs/results/serve/ (SmolLM2-135M, tp 2, CPU ranks; run it on an otherwise idle machine):
#   side_by_side/  TP vs the demo checkpoint's SPD blocks vs 100% SPD, on the shm, gloo and two-simulated-host paths
#   concurrency/   one stream at a time vs 8 concurrent streams (TP, shm): prompts 32-256, 32 tokens out
#   concurrency_decode/  the same with short prompts (16-64) and 128 tokens out
#   chunked_*/     prefill in one step vs in 128-token chunks, long prompts arriving while others decode (TP, shm)
#   single_stream/ 16-token prompts, 32 tokens out, 1 and 8 at a time, through the server (TP, shm)
#   overhead/      `ds-spd bench` decode at batch 1 on the same engine and workload, to compare with single_stream
# Needs the demo's checkpoint (make demo) for the side-by-side run; CKPT=... to use another.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-docs/results/serve}
ckpt=${CKPT:-runs/demo/checkpoint}
mkdir -p "$out"
rm -rf "$out"/side_by_side "$out"/concurrency "$out"/chunked_* "$out"/overhead "$out"/*.log  # this script's own

python -m ds_spd bench-serve --checkpoint "$ckpt" --engines tp,plan,all --paths shm,gloo,2hosts \
  --rates 2,inf --num-requests 16 --prompt-len 32,256 --output-len 32 --repeats 3 --out "$out/side_by_side"

serve_and_bench() {  # NAME SERVE_ARGS -- BENCH_ARGS: one TP server on 2 ranks, bench-serve --url against it
  local name=$1; shift; local serve=(); while [ "$1" != "--" ]; do serve+=("$1"); shift; done; shift
  local port=18${RANDOM:0:3}
  launch/tp.sh 2 serve --port "$port" "${serve[@]}" > "$out/$name.serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 0.5; done
  python -m ds_spd bench-serve --url "http://localhost:$port" "$@" --out "$out/$name"
  kill -TERM "$pid"   # launch/tp.sh passes it to the ranks: rank 0 drains and stops every rank
  wait "$pid"         # 0 after a clean stop
}
serve_and_bench concurrency -- --rates "" --concurrency 1,8 --num-requests 16 --prompt-len 32,256 --output-len 32 \
  --repeats 3
serve_and_bench concurrency_decode -- --rates "" --concurrency 1,8 --num-requests 16 --prompt-len 16,64 \
  --output-len 128 --repeats 2
serve_and_bench single_stream -- --rates "" --concurrency 1,8 --num-requests 16 --prompt-len 16,16 --output-len 32 \
  --repeats 3   # at concurrency 1 the workload of `bench`'s decode_b1 below (16-token prompt, 32 steps)
serve_and_bench chunked_off --max-step-tokens 2048 -- --rates 1 --num-requests 16 --prompt-len 384,512 \
  --output-len 48 --repeats 3
serve_and_bench chunked_128 --max-step-tokens 128 -- --rates 1 --num-requests 16 --prompt-len 384,512 \
  --output-len 48 --repeats 3
launch/tp.sh 2 bench --fractions 0 --comm-paths auto --decode-batches 1 --decode-tokens 32 --prefill-len 256 \
  --repeats 5 --out "$out/overhead" > "$out/overhead.log" 2>&1
echo "wrote $out"
