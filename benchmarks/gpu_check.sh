#!/usr/bin/env bash
# GPU check of the GCKD paper-scale path (ALBEF-base at 384x128 on CUDA); installs and downloads nothing.
#
#   1. `crossret gckd synth` writes small synthetic CUHK-PEDES / ICFG-PEDES / RSTPReid datasets at 384x128.
#   2. A stand-in for ALBEF_4M.pth is written: a random ALBEF-base in ALBEF's key layout (student and
#      momentum copies, 256x256 patch grid, so `pos_embed` is interpolated to 384x128 on load) and a
#      30,522-token stand-in for bert-base-uncased's vocab.txt. Weights are random: the metrics printed are
#      not meaningful, only that every step runs.
#   3. Refusals: `--init` without `--vocab` must exit 2 with one `error:` line.
#   4. The real CLI, as docs/gckd-paper-scale.md runs it: `gckd pretrain --init ... --vocab ... --max-tokens
#      --workers --device`, `gckd adapt --init <pretrain run>`, `gckd eval`, one short epoch each; prints the
#      train and eval seconds of each.
#   5. benchmarks/gckd_throughput.py at source batch 13, 32 and 64, AMP off and bf16: seconds per step,
#      pairs/s and peak GPU memory of a pre-training and an adaptation step (table at the end).
#   6. benchmarks/gckd_gpu_profile.py: the share of an adaptation step's wall time outside CUDA kernels
#      (torch.profiler), at batch 32, AMP off and bf16.
# Sized to take under 8 minutes on one H100 (the ALBEF-base runs and the 6 throughput runs dominate); not yet
# run on a GPU: only the CPU dry run below has run.
#
# Usage:  bash benchmarks/gpu_check.sh [WORK_DIR]
# Environment (defaults in brackets): GPU_DEVICE [cuda]; MODEL [base] (tiny: a CPU dry run of the script
# with a small model, small images and one tiny throughput step; not a check), WORKERS [4] (--workers),
# MAX_TOKENS [72], BATCHES ["13 32 64"], AMPS ["off bf16"], STEPS [5], WARMUP [2].
set -euo pipefail

GPU_DEVICE=${GPU_DEVICE:-cuda}
MODEL=${MODEL:-base}
WORKERS=${WORKERS:-4}
MAX_TOKENS=${MAX_TOKENS:-72}
BATCHES=${BATCHES:-"13 32 64"}
AMPS=${AMPS:-"off bf16"}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
WORK=${1:-$(mktemp -d -t crossret-gckd-gpu-check.XXXXXX)}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ "$MODEL" == tiny ]]; then
    IMAGE_SIZE=(48 24)
    MODEL_SET=(--model tiny)
    BATCHES=${BATCHES_TINY:-2}
    AMPS=${AMPS_TINY:-off}
    STEPS=1
    WARMUP=0
else
    IMAGE_SIZE=(384 128)
    MODEL_SET=(--model base)
fi
if command -v crossret >/dev/null 2>&1; then
    CROSSRET=(crossret)
else
    CROSSRET=(python -m crossret)
fi
START=$SECONDS
section() { echo; echo "== $1 ($((SECONDS - START)) s elapsed)"; }
json_field() {  # json_field KEY [KEY...] < JSON (the last line of the input)
    python -c 'import json, sys
value = json.loads(sys.stdin.read().strip().splitlines()[-1])
for key in sys.argv[1:]:
    value = value[int(key)] if isinstance(value, list) else value[key]
print(value)' "$@"
}

mkdir -p "$WORK"
echo "work directory: $WORK; model $MODEL on $GPU_DEVICE, images ${IMAGE_SIZE[*]}, workers $WORKERS"
python "$(dirname "${BASH_SOURCE[0]}")/_gpu_preflight.py" "$GPU_DEVICE"

section "synthetic person data at ${IMAGE_SIZE[*]}"
"${CROSSRET[@]}" gckd synth "$WORK/data" --train-ids 24 --test-ids 8 --images-per-id 2 \
    --image-size "${IMAGE_SIZE[@]}" --overwrite
SOURCE="$WORK/data/CUHK-PEDES"
TARGET="$WORK/data/RSTPReid"

section "stand-ins for ALBEF_4M.pth and bert-base-uncased/vocab.txt"
python - "$WORK" "$MODEL" "$SOURCE" "$TARGET" <<'EOF'
import sys
from pathlib import Path

import torch

from crossret.data.synthetic_person import dataset_captions
from crossret.textimage.albef import AlbefConfig, AlbefModel
from crossret.textimage.checkpoint import model_to_albef_state
from crossret.textimage.tokenize import train_wordpiece_vocab

work, model_size, roots = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
bert_size = 30522
captions = [c for root in roots for c in dataset_captions(root)]
trained = train_wordpiece_vocab(captions, work / "trained_vocab.txt", vocab_size=2000).read_text().split("\n")[:-1]
tokens = trained + [f"[unused{i}]" for i in range(bert_size - len(trained))]
(work / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
# ALBEF_4M.pth was pre-trained at 256x256: its pos_embed is a 16x16 grid, interpolated on load.
if model_size == "base":
    config = AlbefConfig.base(image_size=(256, 256))
else:
    config = AlbefConfig.tiny(vocab_size=bert_size, max_position=512, image_size=(32, 32))
torch.manual_seed(0)
model = AlbefModel(config)
state = model_to_albef_state(model)
state.update(model_to_albef_state(model, momentum=True))
torch.save({"model": state}, work / "ALBEF_4M-standin.pth")
print(f"vocabulary: {len(tokens)} tokens; checkpoint: {len(state)} tensors, "
      f"{sum(t.numel() for t in state.values()) / 1e6:.1f} M values")
EOF
INIT="$WORK/ALBEF_4M-standin.pth"
VOCAB="$WORK/vocab.txt"
RUN_OPTS=("${MODEL_SET[@]}" --max-tokens "$MAX_TOKENS" --workers "$WORKERS" --device "$GPU_DEVICE"
          --set epochs=1 --set memory_size=256 --set target_batch=13 --rerank-k 16 --json)

section "refusal: --init without --vocab"
status=0
"${CROSSRET[@]}" gckd pretrain --source "$SOURCE" --out "$WORK/refused" --init "$INIT" "${RUN_OPTS[@]}" \
    > /dev/null 2> "$WORK/refused.err" || status=$?
if [[ "$status" != 2 || $(wc -l < "$WORK/refused.err") != 1 || -e "$WORK/refused" ]]; then
    echo "FAIL: expected exit 2, one error line and no run directory; got exit $status:" >&2
    cat "$WORK/refused.err" >&2
    exit 1
fi
echo "ok (exit 2): $(cat "$WORK/refused.err")"

section "gckd pretrain --init (source CUHK-PEDES, evaluated on RSTPReid)"
"${CROSSRET[@]}" gckd pretrain --source "$SOURCE" --target "$TARGET" --out "$WORK/pre" --init "$INIT" \
    --vocab "$VOCAB" "${RUN_OPTS[@]}" > "$WORK/pre.json"
printf 'pretrain: train %.1f s, eval %.1f s, ITC mAP %.4f (random weights)\n' \
    "$(json_field train_seconds < "$WORK/pre.json")" "$(json_field eval_seconds < "$WORK/pre.json")" \
    "$(json_field evaluation itc map < "$WORK/pre.json")"

section "gckd adapt --init <pretrain run>"
"${CROSSRET[@]}" gckd adapt --source "$SOURCE" --target "$TARGET" --out "$WORK/adapt" --init "$WORK/pre" \
    "${RUN_OPTS[@]}" > "$WORK/adapt.json"
printf 'adapt: train %.1f s, eval %.1f s, pseudo-pairs per step %.2f\n' \
    "$(json_field train_seconds < "$WORK/adapt.json")" "$(json_field eval_seconds < "$WORK/adapt.json")" \
    "$(json_field history 0 pseudo_pairs < "$WORK/adapt.json")"

section "gckd eval"
eval_start=$SECONDS
"${CROSSRET[@]}" gckd eval "$WORK/adapt" --data "$TARGET" --device "$GPU_DEVICE" --workers "$WORKERS" \
    --rerank-k 16 --json > "$WORK/eval.json"
echo "eval: $((SECONDS - eval_start)) s with start-up, max_tokens $(json_field max_tokens < "$WORK/eval.json")"

section "throughput: batch $BATCHES, amp $AMPS"
for amp in $AMPS; do
    for batch in $BATCHES; do
        python "$HERE/gckd_throughput.py" --device "$GPU_DEVICE" --batch "$batch" --amp "$amp" --steps "$STEPS" \
            --warmup "$WARMUP" --out "$WORK/throughput" > /dev/null
        echo "batch $batch, amp $amp: done"
    done
done
cat "$WORK/throughput.md"

section "time outside CUDA kernels (adaptation step, batch 32)"
for amp in $AMPS; do
    if [[ "$MODEL" == tiny ]]; then
        profile_opts=(--model tiny --batch 2 --steps 1 --warmup 1)
    else
        profile_opts=(--model base --batch 32 --steps "$STEPS" --warmup "$WARMUP")
    fi
    python "$HERE/gckd_gpu_profile.py" --device "$GPU_DEVICE" --amp "$amp" "${profile_opts[@]}" \
        --out "$WORK/profile-$amp.json" > "$WORK/profile-$amp.txt"
    python - "$WORK/profile-$amp.json" <<'EOF'
import json
import sys

row = json.load(open(sys.argv[1]))
share = row["outside_kernels"]
print(f"amp {row['amp']}: {row['wall_seconds_per_step']:.3f} s/step, kernels "
      f"{'n/a' if row['kernel_seconds_per_step'] is None else format(row['kernel_seconds_per_step'], '.3f')} s/step, "
      f"outside kernels {'n/a (no CUDA)' if share is None else format(share, '.1%')} "
      f"(under the profiler: {'n/a' if share is None else format(row['outside_kernels_profiled'], '.1%')})")
EOF
done

echo
echo "gpu check: finished in $((SECONDS - START)) s (results in $WORK)"
