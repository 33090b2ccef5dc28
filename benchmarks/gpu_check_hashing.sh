#!/usr/bin/env bash
# GPU check of `--device cuda` for the HashNet methods (COUPLE, source-only); installs nothing.
#
# On the benchmark's protocol split (source, target-train with its labels hidden by `crossret fit`, target
# queries), for each method and seed:
#   * `crossret fit --device cuda` and `crossret fit --device cpu`; prints the train seconds of each;
#   * `crossret evaluate` of both models: MAP@all cross-domain (target queries vs the source) and
#     single-domain (target queries vs target-train). CUDA arithmetic is not bit-identical to the CPU's, so
#     the two runs differ slightly; the check fails when a method's mean MAP (over SEEDS) on cuda and on cpu
#     differ by more than MAX_MAP_DIFF points.
# Then `crossret encode --device cuda` of each cuda-trained model must give the same bits as its CPU encode on
# at least MIN_BIT_AGREEMENT of them.
#
# Usage:  CROSSRET_DATA=/path/to/data bash benchmarks/gpu_check_hashing.sh [WORK_DIR]
# Environment (defaults in brackets): GPU_DEVICE [cuda] (cpu runs every step without a GPU: a dry run of the
# script itself), BENCHMARK [digits-m2u], BITS [64], SEEDS ["0 1"], MAX_MAP_DIFF [3] (MAP points),
# MIN_BIT_AGREEMENT [0.99], QUICK [0] (1: a few epochs only, to try the script; not a check).
set -euo pipefail

GPU_DEVICE=${GPU_DEVICE:-cuda}
BENCHMARK=${BENCHMARK:-digits-m2u}
BITS=${BITS:-64}
SEEDS=${SEEDS:-"0 1"}
MAX_MAP_DIFF=${MAX_MAP_DIFF:-3}
MIN_BIT_AGREEMENT=${MIN_BIT_AGREEMENT:-0.99}
QUICK=${QUICK:-0}
WORK=${1:-$(mktemp -d -t crossret-gpu-check.XXXXXX)}
METHODS=(couple source-only)

if [[ -z "${CROSSRET_DATA:-}" ]]; then
    echo "error: set CROSSRET_DATA to the benchmark data directory (see crossret benchmarks)" >&2
    exit 2
fi
if command -v crossret >/dev/null 2>&1; then
    CROSSRET=(crossret)
else
    CROSSRET=(python -m crossret)
fi
mkdir -p "$WORK"
echo "work directory: $WORK; benchmark $BENCHMARK, $BITS bits, seeds $SEEDS, devices $GPU_DEVICE and cpu"

python "$(dirname "${BASH_SOURCE[0]}")/_gpu_preflight.py" "$GPU_DEVICE"

# The protocol split as feature files: what `crossret fit` / `evaluate` / `encode` read.
python - "$BENCHMARK" "$WORK" <<'EOF'
import sys

import numpy as np

from crossret.data import load_benchmark, resolve_data_dir

benchmark, work = sys.argv[1], sys.argv[2]
split = load_benchmark(benchmark, resolve_data_dir(None))
for name, domain in (("source", split.source), ("target_train", split.target_train), ("queries", split.queries)):
    np.savez(f"{work}/{name}.npz", features=domain.features, labels=domain.labels)
np.save(f"{work}/target_train.npy", np.ascontiguousarray(split.target_train.features, dtype=np.float32))
print(f"split: {split.source.n} source, {split.target_train.n} target-train, {split.queries.n} queries, "
      f"{split.source.dim} features")
EOF

quick_sets() {
    if [[ "$QUICK" == 1 ]]; then
        if [[ "$1" == couple ]]; then
            echo --set epochs=8 --set warmup_epochs=2 --set graph_every=2
        else
            echo --set epochs=3
        fi
    fi
}

json_field() {  # json_field KEY < JSON
    python -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

RESULTS="$WORK/results.tsv"
printf 'method\tseed\trun\tdevice\ttrain_seconds\tmap_cross\tmap_single\n' > "$RESULTS"
for method in "${METHODS[@]}"; do
    for seed in $SEEDS; do
        for run in gpu cpu; do
            device=$([[ "$run" == gpu ]] && echo "$GPU_DEVICE" || echo cpu)
            model="$WORK/$method-s$seed-$run"
            # shellcheck disable=SC2046  # quick_sets gives separate words on purpose
            "${CROSSRET[@]}" fit "$method" --source "$WORK/source.npz" --target "$WORK/target_train.npz" \
                --label-base 0 --bits "$BITS" --seed "$seed" --device "$device" --out "$model" --overwrite \
                $(quick_sets "$method") --json > /dev/null
            seconds=$(json_field fit_seconds < "$model/diagnostics.json")
            map_cross=$("${CROSSRET[@]}" evaluate "$model" --queries "$WORK/queries.npz" \
                --database "$WORK/source.npz" --database-domain source --label-base 0 --json | json_field map)
            map_single=$("${CROSSRET[@]}" evaluate "$model" --queries "$WORK/queries.npz" \
                --database "$WORK/target_train.npz" --label-base 0 --json | json_field map)
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$method" "$seed" "$run" "$device" "$seconds" "$map_cross" \
                "$map_single" >> "$RESULTS"
            printf '%-12s seed %s  %-7s train %8.2fs  MAP cross %.4f  single %.4f\n' "$method" "$seed" "$device" \
                "$seconds" "$map_cross" "$map_single"
        done
    done
done

status=0
python - "$RESULTS" "$GPU_DEVICE" "$MAX_MAP_DIFF" <<'EOF' || status=1
import csv
import sys

path, gpu, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
rows = list(csv.DictReader(open(path), delimiter="\t"))
failed = False
for method in dict.fromkeys(row["method"] for row in rows):
    def of(run: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if r["method"] == method and r["run"] == run]

    for metric in ("map_cross", "map_single"):
        mean = {run: 100 * sum(of(run, metric)) / len(of(run, metric)) for run in ("gpu", "cpu")}
        diff = abs(mean["gpu"] - mean["cpu"])
        ok = diff <= limit
        failed |= not ok
        print(f"{method:12s} {metric:10s} mean over seeds: {gpu} {mean['gpu']:6.2f}  cpu {mean['cpu']:6.2f}  "
              f"|diff| {diff:5.2f} MAP points (limit {limit:g}): {'ok' if ok else 'FAIL'}")
    print(f"{method:12s} train seconds, all seeds: {gpu} {sum(of('gpu', 'train_seconds')):.2f}  "
          f"cpu {sum(of('cpu', 'train_seconds')):.2f}")
sys.exit(1 if failed else 0)
EOF

first_seed=${SEEDS%% *}
for method in "${METHODS[@]}"; do
    model="$WORK/$method-s$first_seed-gpu"
    "${CROSSRET[@]}" encode "$model" --input "$WORK/target_train.npy" --out "$WORK/$method.gpu-codes.npy" \
        --device "$GPU_DEVICE" --overwrite --json > /dev/null
    "${CROSSRET[@]}" encode "$model" --input "$WORK/target_train.npy" --out "$WORK/$method.cpu-codes.npy" \
        --device cpu --overwrite --json > /dev/null
    python - "$WORK/$method.gpu-codes.npy" "$WORK/$method.cpu-codes.npy" "$MIN_BIT_AGREEMENT" "$method" \
        "$GPU_DEVICE" <<'EOF' || status=1
import sys

import numpy as np

gpu, cpu = np.load(sys.argv[1]), np.load(sys.argv[2])
minimum, method, device = float(sys.argv[3]), sys.argv[4], sys.argv[5]
if gpu.shape != cpu.shape:
    sys.exit(f"{method}: encode shapes differ: {gpu.shape} on {device}, {cpu.shape} on cpu")
agreement = float((gpu == cpu).mean())
ok = agreement >= minimum
print(f"{method:12s} encode --device {device} vs cpu (model trained on {device}): {agreement:.6f} of "
      f"{gpu.size} bits agree (minimum {minimum:g}): {'ok' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
done

if [[ "$status" != 0 ]]; then
    echo "gpu check: FAILED (results in $RESULTS)" >&2
    exit 1
fi
echo "gpu check: passed (results in $RESULTS)"
