#!/usr/bin/env bash
# torchrun, one node or several (run this script once on every node):
#
#   launch/torchrun.sh CONFIG OUT_DIR [--set key=value ...]
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 launch/torchrun.sh ...   # on node-001
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-001 launch/torchrun.sh ...   # on node-002
#
# NPROC_PER_NODE processes per node (default: every visible GPU; 2 CPU ranks without one)
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
# DRY_RUN=1      print the command instead of running it
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,11p' "$0" >&2
    exit 2
fi
CONFIG=$1 OUT_DIR=$2
shift 2
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 ]]; then
    rdzv=(--standalone)
else
    rdzv=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}"
          --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
fi
cmd=(torchrun "${rdzv[@]}" --nproc_per_node "$NPROC_PER_NODE"
     -m moetrain.cli train "$CONFIG" --output-dir "$OUT_DIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
