#!/usr/bin/env bash
# The image and fine-tuning rows of the tables of docs/compression.md and benchmarks/compression.md, reproduced:
#
#   benchmarks/compression.sh [RUNS]        # RUNS defaults to /tmp/compression-runs; everything is written there
#
# For each of experiments/cnn_digits.py, vit_digits.py and finetune_genre.py (from a short bert_tiny_mlm
# pretraining): a float32 run; its int8 and int4 weight-only copies (`bigjax quantize`); the same training with 50%
# unstructured magnitude pruning (config.prune); for finetune_genre also LoRA, QLoRA and int8 QAT; for cnn_digits a quarter-width student trained alone and distilled
# from the float run (config.distill). Then, for each run:
#   * on disk: the bytes of the newest checkpoint's params/ directory (`du -sb`, Orbax's files as written);
#   * quality: `bigjax eval --once` (accuracy and loss over the whole eval split), read from DIR/eval/metrics.jsonl;
#   * speed: benchmarks/compression_speed.py, the eval step (forward + loss, synthetic batches of the run's shapes)
#     of each run of one experiment, timed alternately in one process, median of three rounds, as a ratio to the
#     float32 run's examples/s (bench builds each run's model from its config.json; it does not read the weights).
# The share of zeros in the kernels is printed too (the pruned runs': 50%).
# It also re-times shakespeare_char's eval step in float32, int8 weight-only and int8 dynamic (docs/compression.md's
# Quantization table's speed figures), from a 20-step run of that experiment's shapes.
#
# CPU only, one seed, a few minutes a training; run it on an idle machine (`uptime` is printed before each speed
# measurement: the ratios are of runs timed in the same process, but a loaded machine makes them noisy).
# It is not part of `make test`. Set BIGJAX / PYTHON to the venv's executables if they are not on PATH.
set -euo pipefail

RUNS=${1:-/tmp/compression-runs}
BIGJAX=${BIGJAX:-bigjax}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$RUNS"

train() {  # train WORKDIR CONFIG [OVERRIDES...]: once (a finished workdir is kept)
  local dir=$1; shift
  [ -f "$dir/config.json" ] && [ -d "$dir/checkpoints" ] && return 0
  "$BIGJAX" train --workdir "$dir" --config "$@" > "$dir.train.log" 2>&1
}

quantize() {  # quantize FLOAT OUT [ARGS...]
  local src=$1 out=$2; shift 2
  [ -d "$out/checkpoints" ] || "$BIGJAX" quantize --workdir "$src" --out "$out" "$@" > "$out.quantize.log" 2>&1
}

report() {  # report EXPERIMENT STEPS RUN...: size, eval accuracy/loss, eval-step speed vs the first run
  local name=$1 steps=$2; shift 2
  echo "== $name"
  for dir in "$@"; do
    "$BIGJAX" eval --workdir "$dir" --once > "$dir.eval.log" 2>&1
    local newest params
    newest=$(ls "$dir/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
    params=$(du -sb "$dir/checkpoints/$newest/params" | cut -f1)
    "$PYTHON" - "$dir" "$newest" "$params" <<'EOF'
import json, pathlib, sys
d, step, size = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
m = json.loads((d / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
acc, loss = m.get("eval/accuracy", m.get("accuracy")), m.get("eval/loss", m.get("loss"))
print(f"{d.name:24s} step {step:>5s}  params {size / 1e6:.3f} MB  accuracy {acc:.4f}  loss {loss:.4f}")
EOF
    "$PYTHON" "$HERE/compression_sparsity.py" "$dir/checkpoints/$newest/params"
  done
  uptime
  "$PYTHON" "$HERE/compression_speed.py" --rounds 3 --steps "$steps" --json "$RUNS/$name.speed.json" "$@"
}

# --- cnn_digits: 1500 steps (the experiment's default) -------------------------------------------------------------
C=experiments/cnn_digits.py
PRUNE_1500=(--config.prune.kind=unstructured --config.prune.sparsity=0.5 --config.prune.start_step=300
            --config.prune.end_step=1000 --config.prune.every=50)
train "$RUNS/cnn" $C
quantize "$RUNS/cnn" "$RUNS/cnn_int8"
quantize "$RUNS/cnn" "$RUNS/cnn_int4" --bits 4
train "$RUNS/cnn_pruned" $C "${PRUNE_1500[@]}"
SMALL=(--config.model.features="(8,16)" --config.model.hidden_dim=64)  # 7% of the float run's parameters
train "$RUNS/cnn_small" $C "${SMALL[@]}"
train "$RUNS/cnn_small_distilled" $C "${SMALL[@]}" --config.distill.teacher="$RUNS/cnn" \
      --config.distill.temperature=2 --config.distill.alpha=0.5
train "$RUNS/cnn_small_distilled_t1" $C "${SMALL[@]}" --config.distill.teacher="$RUNS/cnn" \
      --config.distill.temperature=1 --config.distill.alpha=0.9
# The eval-step counts timed per round are sized to a few seconds each on 2 CPU cores.
report cnn_digits 2000 "$RUNS/cnn" "$RUNS/cnn_int8" "$RUNS/cnn_int4" "$RUNS/cnn_pruned" "$RUNS/cnn_small" \
       "$RUNS/cnn_small_distilled" "$RUNS/cnn_small_distilled_t1"

# --- vit_digits: 1500 steps (the experiment's default) -------------------------------------------------------------
V=experiments/vit_digits.py
train "$RUNS/vit" $V
quantize "$RUNS/vit" "$RUNS/vit_int8"
quantize "$RUNS/vit" "$RUNS/vit_int4" --bits 4 --sub-channel 16  # attention's output kernel: 4 heads x 16
train "$RUNS/vit_pruned" $V "${PRUNE_1500[@]}"
report vit_digits 200 "$RUNS/vit" "$RUNS/vit_int8" "$RUNS/vit_int4" "$RUNS/vit_pruned"

# --- finetune_genre from bert_tiny_mlm -----------------------------------------------------------------------------
# BERT_STEPS of masked-LM pretraining, GENRE_STEPS of fine-tuning (early stopping off, so every row is the last step).
BERT_STEPS=${BERT_STEPS:-300}
GENRE_STEPS=${GENRE_STEPS:-300}
train "$RUNS/bert_tiny_mlm" experiments/bert_tiny_mlm.py:steps=$BERT_STEPS
G="experiments/finetune_genre.py:init=$RUNS/bert_tiny_mlm,steps=$GENRE_STEPS"
GENRE=(--config.early_stopping.metric= --config.checkpoint_every=$GENRE_STEPS)
train "$RUNS/genre" "$G" "${GENRE[@]}"
quantize "$RUNS/genre" "$RUNS/genre_int8"
quantize "$RUNS/genre" "$RUNS/genre_int4" --bits 4
train "$RUNS/genre_pruned" "$G" "${GENRE[@]}" --config.prune.kind=unstructured --config.prune.sparsity=0.5 \
      --config.prune.start_step=50 --config.prune.end_step=200 --config.prune.every=25
# LoRA (rank 8, the head and pooler trained whole), QLoRA over an int4 base, and int8 quantization-aware training.
train "$RUNS/genre_lora" "$G" "${GENRE[@]}" --config.lora.rank=8 --config.optim.lr=1e-3
train "$RUNS/genre_qlora" "$G" "${GENRE[@]}" --config.lora.rank=8 --config.quant.bits=4 --config.optim.lr=1e-3
train "$RUNS/genre_qat8" "$G" "${GENRE[@]}" --config.quant.bits=8 --config.quant.qat=True
quantize "$RUNS/genre_qat8" "$RUNS/genre_qat8_int8"  # as it trained: int8
[ -d "$RUNS/genre_lora_adapters" ] || "$BIGJAX" lora save --workdir "$RUNS/genre_lora" --out "$RUNS/genre_lora_adapters"
du -sb "$RUNS/genre_lora_adapters"/* "$RUNS"/genre*/checkpoints/300/opt_state
report finetune_genre 100 "$RUNS/genre" "$RUNS/genre_int8" "$RUNS/genre_int4" "$RUNS/genre_pruned" \
       "$RUNS/genre_lora" "$RUNS/genre_qlora" "$RUNS/genre_qat8" "$RUNS/genre_qat8_int8"

# --- shakespeare_char: the int8 dynamic speed ratio, re-timed -------------------------------------------------------
# Only the speed is wanted here, and the eval step's speed does not depend on the weights' values (bench runs
# synthetic batches through parameters of the run's shapes): 20 steps make a checkpoint to quantize.
train "$RUNS/shakespeare_char" experiments/shakespeare_char.py:steps=20
quantize "$RUNS/shakespeare_char" "$RUNS/shakespeare_int8"
quantize "$RUNS/shakespeare_char" "$RUNS/shakespeare_int8_dynamic" --mode dynamic
report shakespeare_char 100 "$RUNS/shakespeare_char" "$RUNS/shakespeare_int8" "$RUNS/shakespeare_int8_dynamic"
