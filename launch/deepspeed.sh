#!/usr/bin/env bash
# One node, N processes, through DeepSpeed's launcher:
#
#   launch/deepspeed.sh CONFIG OUT_DIR [--set key=value ...]
#   NGPUS=8 launch/deepspeed.sh configs/demo.yaml runs/demo --set parallel.ep_size=8 parallel.zero_stage=1
#
# NGPUS       processes (default: every visible GPU; 2 CPU ranks on a machine without one)
# MASTER_PORT rendezvous port (default 29500)
# DRY_RUN=1   print the command instead of running it
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
CONFIG=$1 OUT_DIR=$2
shift 2
NGPUS=${NGPUS:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
cmd=(deepspeed --num_gpus "$NGPUS" --master_port "${MASTER_PORT:-29500}"
     --module moetrain.cli train "$CONFIG" --output-dir "$OUT_DIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
