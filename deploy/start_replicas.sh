#!/usr/bin/env bash
# Start N replicas of the dense app on 127.0.0.1:$BASE_PORT+1 ... +N (default 7861..), each
# `python app.py --port P`, logs in deploy/run/logs/replica-P.log. With CUDA GPUs, replica i
# sees only GPU i mod (number of GPUs); on CPU, each replica gets its share of the cores.
# Stops them all on Ctrl-C / SIGTERM. Pair with deploy/nginx.conf (docs/deploy.md).
#
#   deploy/start_replicas.sh [N]          # BASE_PORT=7860, GPUS="0 1" to choose GPUs
set -euo pipefail

N=${1:-2}
BASE_PORT=${BASE_PORT:-7860}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOGS=$ROOT/deploy/run/logs
mkdir -p "$LOGS" "$ROOT/deploy/run/temp"

# GPUs to spread the replicas over: $GPUS, else every GPU nvidia-smi lists, else none (CPU).
if [[ -z ${GPUS+x} ]]; then
    GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)
fi
read -r -a gpus <<< "${GPUS:-}"
threads=$(( $(nproc) / N )); (( threads > 0 )) || threads=1

pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for (( i = 1; i <= N; i++ )); do
    port=$(( BASE_PORT + i ))
    env=(OMP_NUM_THREADS="$threads")  # N replicas on shared cores: don't oversubscribe them
    if (( ${#gpus[@]} )); then
        env+=(CUDA_VISIBLE_DEVICES="${gpus[$(( (i - 1) % ${#gpus[@]} ))]}")
    fi
    # --host 127.0.0.1: only nginx (on this machine) reaches a replica.
    env "${env[@]}" python "$ROOT/app.py" --host 127.0.0.1 --port "$port" \
        > "$LOGS/replica-$port.log" 2>&1 &
    pids+=($!)
    echo "replica $i: http://127.0.0.1:$port (pid $!, log $LOGS/replica-$port.log)"
done
wait -n  # one replica exited: stop the others (the trap), so a supervisor restarts the set
