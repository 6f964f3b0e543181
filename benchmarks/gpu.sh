#!/usr/bin/env bash
# The measurements planned in benchmarks/NOTES.md, one group per call of the GPU machine (each inside 10 minutes).
#
#   bash benchmarks/gpu.sh GROUP...   GROUP: check | gpt2 | levers | flags | llama | largest | depth | loop | nanogpt
#
# Each measurement is one process (`bigjax bench`, `bigjax train` or nanoGPT's bench.py); a failure (an
# out-of-memory, say) is recorded and the group goes on. Results: one JSON object per line, with the
# measurement's name, in $RESULTS/GROUP.jsonl ($RESULTS: $OUT where the device tool sets it, else runs/bench);
# `python3 benchmarks/summarize.py $RESULTS/*.jsonl` prints them as a table.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: bash benchmarks/gpu.sh check|gpt2|levers|flags|llama|largest|depth|loop|nanogpt ..." >&2; exit 2; }
RESULTS=${RESULTS:-${OUT:-runs/bench}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
GPT2=experiments/gpt2_124m.py
LLAMA=experiments/llama_1b.py

# The wheels the image lacks, carried in .whl/ (benchmarks/fetch_wheels.sh fetches them).
if ! $PY -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
unset JAX_COMPILATION_CACHE_DIR  # compile times are measured: no cache hits

record() {  # record NAME FILE: FILE's JSON object, named, as one line of GROUP.jsonl
  $PY -c 'import json, sys; row = json.load(open(sys.argv[2])); row["name"] = sys.argv[1]; print(json.dumps(row))' \
    "$1" "$2" >>"$RESULTS/$GROUP.jsonl"
}

failed() {  # failed NAME: a line saying the measurement did not finish
  echo "{\"name\": \"$1\", \"failed\": true}" >>"$RESULTS/$GROUP.jsonl"
  echo "== $1 FAILED"
}

bench() {  # bench NAME ARGS...: `bigjax bench ARGS`, recorded under NAME
  local name=$1
  shift
  echo "== $name: bigjax bench $*"
  if $PY -m bigjax.cli bench "$@" --json "$RESULTS/last.json"; then record "$name" "$RESULTS/last.json"; else failed "$name"; fi
}

train_loop() {  # train_loop NAME ARGS...: 300 steps of `bigjax train` on synthetic data; its step times, recorded
  local name=$1 workdir=/tmp/bigjax-loop-$1
  shift
  echo "== $name: bigjax train $*"
  rm -rf "$workdir"
  if $PY -m bigjax.cli train --workdir "$workdir" --config.total_steps=300 --config.checkpoint_every=0 "$@"; then
    $PY benchmarks/summarize.py --train "$workdir/metrics.jsonl" --skip-steps 50 >"$RESULTS/last.json" &&
      record "$name" "$RESULTS/last.json"
  else
    failed "$name"
  fi
  rm -rf "$workdir"
}

run_group() {  # run_group GROUP: its measurements, appended to $RESULTS/GROUP.jsonl
  GROUP=$1
  case $GROUP in
  check)  # the machine, the versions, the flags this jaxlib knows, and a tiny bench that reads the GPU's memory
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
    $PY -m pytest -q -p no:cacheprovider tests/test_xla_flags.py tests/test_bench.py
    bench tiny --config experiments/tiny.py --steps 20 --warmup 5
    ;;
  gpt2)  # GPT-2 124M, T=1024: the batches nanoGPT and the issue quote, and nanoGPT's bias-free variant
    bench gpt2_b24 --config $GPT2
    bench gpt2_b12 --config $GPT2:batch=12
    bench gpt2_b24_nobias --config $GPT2 --config.model.use_bias=false
    bench gpt2_b48 --config $GPT2:batch=48
    ;;
  levers)  # one change at a time against gpt2_b24
    bench gpt2_b24_attention_xla --config $GPT2 --config.model.attention=xla
    bench gpt2_b24_unrolled --config $GPT2 --config.model.scan_layers=false
    bench gpt2_b24_remat_dots --config $GPT2 --config.model.remat=dots
    bench gpt2_b24_remat_full --config $GPT2 --config.model.remat=full
    bench gpt2_b24_mu_bf16 --config $GPT2 --config.optim.mu_dtype=bfloat16
    bench gpt2_b24_loss_chunk128 --config $GPT2 --config.task.loss_chunk=128
    ;;
  flags)  # bigjax's GPU flags off, then XLA's default back for one flag at a time (the user's XLA_FLAGS win)
    BIGJAX_XLA_FLAGS=off bench gpt2_b24_flags_off --config $GPT2
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=true bench gpt2_b24_triton_gemm --config $GPT2
    XLA_FLAGS=--xla_gpu_enable_command_buffer= bench gpt2_b24_no_command_buffers --config $GPT2
    XLA_FLAGS=--xla_gpu_enable_while_loop_double_buffering=true bench gpt2_b24_double_buffering --config $GPT2
    XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false bench gpt2_b24_no_lhs --config $GPT2
    ;;
  llama)  # Llama-style 1.1B, T=2048: remat policies, batch, and the chunked loss without remat
    bench llama_b8_remat_full --config $LLAMA
    bench llama_b8_remat_none --config $LLAMA:remat=none
    bench llama_b8_remat_dots_no_batch --config $LLAMA:remat=dots_no_batch
    bench llama_b8_remat_dots --config $LLAMA:remat=dots
    bench llama_b16_remat_full --config $LLAMA:batch=16
    bench llama_b8_remat_full_mu_bf16 --config $LLAMA --config.optim.mu_dtype=bfloat16
    bench llama_b8_remat_none_loss_chunk256 --config $LLAMA:remat=none --config.task.loss_chunk=256
    ;;
  depth)  # compile time against depth: scanned layers should stay flat, unrolled ones grow
    for layers in 12 24 48; do
      bench gpt2_scan_L$layers --config $GPT2 --steps 5 --warmup 1 --windows 1 --config.model.num_layers=$layers
    done
    for layers in 12 24; do
      bench gpt2_unrolled_L$layers --config $GPT2 --steps 5 --warmup 1 --windows 1 \
        --config.model.num_layers=$layers --config.model.scan_layers=false
    done
    ;;
  largest)  # the largest Llama-style model that trains at T=2048 (remat full; sizes from `bigjax plan`, NOTES.md)
    wide="--config.model.d_model=3200 --config.model.num_heads=32 --config.model.num_kv_heads=8 --config.model.mlp_dim=8640"
    short="--steps 10 --warmup 2 --windows 2"
    local -x XLA_PYTHON_CLIENT_MEM_FRACTION=0.95  # this group only
    bench llama_4.1b_b4 --config $LLAMA:batch=4 $wide --config.model.num_layers=36 $short
    bench llama_4.5b_b2 --config $LLAMA:batch=2 $wide --config.model.num_layers=40 $short
    bench llama_5.0b_b2_mu_bf16 --config $LLAMA:batch=2 $wide --config.model.num_layers=44 --config.optim.mu_dtype=bfloat16 $short
    bench llama_5.4b_b2_mu_bf16 --config $LLAMA:batch=2 $wide --config.model.num_layers=48 --config.optim.mu_dtype=bfloat16 $short
    ;;
  loop)  # the train loop itself: logging every step against every 100, prefetch off against on
    train_loop loop_log100 --config $GPT2 --config.log_every=100
    train_loop loop_log1 --config $GPT2 --config.log_every=1
    train_loop loop_log100_prefetch0 --config $GPT2 --config.log_every=100 --config.data.prefetch=0
    ;;
  nanogpt)  # nanoGPT's bench.py and bigjax bench side by side, same GPU, same process environment, same batches
    bash benchmarks/nanogpt.sh 12 24 >>"$RESULTS/$GROUP.jsonl" || failed nanogpt
    bench gpt2_b12_nobias --config $GPT2:batch=12 --config.model.use_bias=false
    bench gpt2_b24_nobias --config $GPT2 --config.model.use_bias=false
    ;;
  *)
    echo "unknown group $GROUP" >&2
    return 2
    ;;
  esac
}

for group in "$@"; do
  run_group "$group" || exit 2
  echo "== $group done: $RESULTS/$group.jsonl"
done
rm -f "$RESULTS/last.json"
