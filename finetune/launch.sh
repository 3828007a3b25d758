#!/usr/bin/env bash
# Launch finetune.train under torchrun, on one machine or many.
#
# Usage:
#   finetune/launch.sh CONFIG.yaml [launcher flags] [key=value overrides...] [--resume]
#   finetune/launch.sh finetune/configs/tiny_cpu.yaml --nproc-per-node 2           # 2 CPU processes (gloo)
#   finetune/launch.sh finetune/configs/lora_7b.yaml --nproc-per-node 8 max_steps=100
#   finetune/launch.sh finetune/configs/full_7b_zero3.yaml --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500
#   finetune/launch.sh CONFIG.yaml --dry-run                                         # print the command only
#
# Launcher settings come from flags, else the environment, else defaults:
#   --nproc-per-node  NPROC_PER_NODE   number of GPUs (nvidia-smi), else 1
#   --nnodes          NNODES           1
#   --node-rank       NODE_RANK        0
#   --rdzv-endpoint   RDZV_ENDPOINT    MASTER_ADDR:MASTER_PORT when both are set, else localhost:0 on one node
#                                      (a free port, so runs side by side never join each other), else localhost:29500
#   --rdzv-id         RDZV_ID          medmax
#   PYTHON (environment)               .venv/bin/python when present, else python
# Without a CUDA device the run uses the gloo backend (ddp_backend=gloo; a later override wins).
# The settings are checked once (python -m finetune.train --check) before torchrun starts any process.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
CONFIG="$1"; shift
[[ -f "$CONFIG" ]] || { echo "launch.sh: config $CONFIG does not exist" >&2; exit 2; }

# GPUs nvidia-smi lists; 0 without nvidia-smi, or when it lists none (it exits non-zero, grep -c prints 0 and fails)
gpus() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"; fi
  [[ "$n" =~ ^[0-9]+$ ]] || n=0
  echo "$n"
}
NGPU="$(gpus)"
NPROC="${NPROC_PER_NODE:-}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
if [[ -n "${MASTER_ADDR:-}" && -n "${MASTER_PORT:-}" ]]; then DEFAULT_RDZV="$MASTER_ADDR:$MASTER_PORT"; else DEFAULT_RDZV=""; fi
RDZV="${RDZV_ENDPOINT:-$DEFAULT_RDZV}"
RDZV_ID="${RDZV_ID:-medmax}"
DRY=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --rdzv-endpoint) RDZV="$2"; shift 2 ;;
    --rdzv-id) RDZV_ID="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [[ -z "$RDZV" ]]; then if [[ "$NNODES" == 1 ]]; then RDZV="localhost:0"; else RDZV="localhost:29500"; fi; fi
if [[ -z "$NPROC" ]]; then if [[ "$NGPU" -gt 0 ]]; then NPROC="$NGPU"; else NPROC=1; fi; fi
BACKEND=()
if [[ "$NGPU" -eq 0 ]]; then BACKEND=(ddp_backend=gloo); fi

if [[ -z "${PYTHON:-}" ]]; then
  ROOT="$(cd "$(dirname "$0")/.." && pwd)"
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
CMD=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --nnodes "$NNODES" --node-rank "$NODE_RANK"
     --rdzv-backend c10d --rdzv-endpoint "$RDZV" --rdzv-id "$RDZV_ID"
     -m finetune.train --config "$CONFIG" "${BACKEND[@]}" "${ARGS[@]}")
if [[ "$DRY" -eq 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
# Check the settings once, here, before any process starts: a contradiction is one error, not one per rank
WORLD=()  # not WORLD_SIZE in the environment: accelerate would start a process group in the check
if [[ "$NPROC" =~ ^[0-9]+$ && "$NNODES" =~ ^[0-9]+$ ]]; then WORLD=(--world-size "$((NPROC * NNODES))"); fi
"$PYTHON" -m finetune.train --check "${WORLD[@]}" --config "$CONFIG" "${ARGS[@]}"  # ddp_backend: a process group
exec "${CMD[@]}"
