#!/usr/bin/env bash
# `accelerate launch` with the DeepSpeed plugin config launch/accelerate_deepspeed.yaml:
#
#   launch/accelerate.sh CONFIG OUT_DIR [--set key=value ...]
#
# NPROC          processes (default: every visible GPU; 2 CPU ranks without one)
# ACCEL_CONFIG   accelerate config file (default launch/accelerate_deepspeed.yaml); its zero_stage
#                and mixed_precision must agree with the moetrain config (checked at start)
# MASTER_PORT    rendezvous port (default 29500)
# DRY_RUN=1      print the command instead of running it
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
CONFIG=$1 OUT_DIR=$2
shift 2
NPROC=${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
cmd=(accelerate launch --config_file "${ACCEL_CONFIG:-launch/accelerate_deepspeed.yaml}"
     --num_processes "$NPROC" --main_process_port "${MASTER_PORT:-29500}"
     -m moetrain.cli train "$CONFIG" --output-dir "$OUT_DIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
