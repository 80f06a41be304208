#!/usr/bin/env bash
# One GPU lease, one command (see docs/benchmarks.md, "GPU"): the GPU benchmark first, alone on
# the card, then trainings side by side for MINUTES of wall-clock time each. Expects the data
# and fp16 weights it needs under .dev/ (the machine reaches nothing else; build it with
# scripts/gpu_payload.py) and writes what comes back to $OUT. No step stops the others: a
# failed benchmark still leaves the training.
export PYTHONUNBUFFERED=1 DENSE_WEIGHTS=$PWD/.dev/weights DENSE_DATA=$PWD/.dev/data
BUDGET_S=${BUDGET_S:-540}  # the whole script, within the call's limit; training gets the rest
DEVICE=${DEVICE:-cuda}
OUT=${OUT:?set OUT}
PY=${PY:-python3}
RUNS=${RUNS_DIR:-/tmp/gpu-runs}
TRAIN_ARGS=${TRAIN_ARGS:-}  # e.g. "--steps 2" for a dry run on a CPU
mkdir -p "$RUNS" "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RUNS/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.cuda.is_available())"

# The GPU-only tests first (`pytest -m gpu`: CUDA-graph serving, the bench's GPU variants, the
# out-of-memory fallback), from pytest's wheels in .dev/wheels where the machine lacks it.
if [ "${TESTS:-1}" = 1 ]; then
  $PY -c "import pytest" 2>/dev/null \
    || $PY -m pip install -q --no-index --find-links .dev/wheels pytest 2>&1 | tail -n 2
  # Only the files that hold `gpu` tests: the others import gradio, which that machine lacks.
  timeout 90 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_bench.py \
    tests/test_restoration.py 2>&1 | tail -n 30 \
    | tee "$RUNS/gpu-tests.txt"
fi

# realesrgan-x4plus and blazepose-full travel without their weights (64 MiB limit): their
# throughput is timed with random weights of the same graph, which costs a GPU the same time.
[ -d .dev/weights-config ] && $PY - <<'PY'
import json, os, pathlib, torch
from dense import zoo
for folder in pathlib.Path(".dev/weights-config").iterdir():
    config = json.loads((folder / "config.json").read_text())
    config.pop("sha256", None)
    config["weights_note"] = "random weights of the same graph, for timing only"
    state = zoo.build(config).half().state_dict()
    zoo.save_folder(pathlib.Path(os.environ["DENSE_WEIGHTS"]) / folder.name, state, config, "")
PY

BENCH=${BENCH:-1}            # 0: training only
RESERVE_S=${RESERVE_S:-80}   # kept for a last epoch and the copying back
# Each training: "task config run-name [more dense train arguments]". The default: the wide
# deblurring U-Net of issue 22, which a 2-core CPU cannot train far enough (docs/benchmarks.md,
# "Deblurring"). Earlier sessions ran "seg configs/unet-camvid-stage3.toml unet-camvid-stage3
# --init unet-camvid" and "sr configs/unet-sr-x4-gpu-ft.toml unet-sr-x4-gpu-ft --init unet-sr-x4".
JOBS=${JOBS:-"deblur configs/unet-deblur-wide.toml unet-deblur-wide"}
# One BLAS thread per process: without it, no SR epoch finished in 6 minutes in the first call
# (a dozen data workers, each free to start 16 OpenBLAS threads: the likely cause); with it,
# the second call ran the same jobs at 40-60 steps/s.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

bench() { timeout "$1" $PY -m dense bench "${@:2}" --device "$DEVICE" --peers 2>&1 \
          | tee -a "$RUNS/bench.txt"; }
[ "$BENCH" = 1 ] && bench 90 unet-camvid --size 360 480 --batch 32 --runs 50
[ "$BENCH" = 1 ] && bench 90 blazepose-full --batch 32 --runs 50
[ "$BENCH" = 1 ] && bench 90 realesrgan-x4plus --size 128 128 --batch 32 --runs 20

# Training gets what the benchmark left, less time for a last epoch and the copying back; a
# run still going at the hard stop is cut (its snapshots and best weights are on disk).
MINUTES=${MINUTES:-$($PY -c "print(round(max(1.0, ($BUDGET_S - $SECONDS - $RESERVE_S) / 60), 2))")}
STOP=$((BUDGET_S - SECONDS - 25))
echo "training for $MINUTES min each (hard stop after $STOP s)"
train() { timeout "$STOP" $PY -m dense train "$1" "$2" --device "$DEVICE" --minutes "$MINUTES" \
          --run-dir "$RUNS/$3" "${@:4}" $TRAIN_ARGS > "$RUNS/$3.log" 2>&1; }
while read -r task config name more; do
  # shellcheck disable=SC2086  # the extra arguments are meant to split
  train "$task" "$config" "$name" $more &
done <<< "$JOBS"
wait
tail -n 3 "$RUNS"/*.log

# Back: the last four camvid snapshots, each SR run's best weights, and one archive of the rest.
# Snapshots go back in fp16, as the bundled unet-camvid is stored (16 MiB per file back).
for f in $(ls "$RUNS"/unet-camvid-stage3/epoch*.pt 2>/dev/null | tail -n 4); do
  $PY -c "import sys, torch; s = torch.load(sys.argv[1], weights_only=True)
s['model'] = {k: v.half() if v.is_floating_point() else v for k, v in s['model'].items()}
torch.save(s, sys.argv[2])" "$f" "$OUT/camvid-$(basename "$f")"
done
for f in "$RUNS"/unet-sr-*/best.pt; do cp "$f" "$OUT/$(basename "$(dirname "$f")")-best.pt"; done
tar -C "$RUNS" -czf "$OUT/logs.tar.gz" --exclude='*.pt' --exclude='*.tmp' --exclude='*.safetensors' .
ls -la "$OUT"
[ "$BENCH" = 1 ] && grep -v "^{" "$RUNS/bench.txt"
