#!/usr/bin/env bash
# Several nodes through DeepSpeed's launcher (pdsh over passwordless ssh by default):
#
#   HOSTFILE=launch/hostfile launch/deepspeed_multinode.sh CONFIG OUT_DIR [--set key=value ...]
#
# Run it on the first host of the hostfile. Every node needs the same checkout and Python
# environment at the same path, and OUT_DIR on a shared file system (rank 0 publishes the
# checkpoints every rank writes). Environment variables listed in ./.deepspeed_env
# (NAME=value lines, e.g. NCCL_SOCKET_IFNAME=eth0) are forwarded to every node.
#
# HOSTFILE     "hostname slots=GPUS" per line (default launch/hostfile.example)
# MASTER_ADDR  address of the first host as the others reach it (default: its name in HOSTFILE)
# MASTER_PORT  rendezvous port (default 29500)
# LAUNCHER     pdsh | openmpi | mvapich | slurm (default pdsh)
# DRY_RUN=1    print the command instead of running it
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
CONFIG=$1 OUT_DIR=$2
shift 2
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
cmd=(deepspeed --hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}"
     --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}"
     --module moetrain.cli train "$CONFIG" --output-dir "$OUT_DIR" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then echo "${cmd[@]}"; else exec "${cmd[@]}"; fi
