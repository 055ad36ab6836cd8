#!/usr/bin/env bash
# Several machines without a scheduler: run this on every machine with its own NODE_RANK.
#
#   # on the first machine (10.0.0.1):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh \
#       --config launch/configs/irra.yaml data.shards=/shared/shards/cuhk \
#       train.output_dir=/shared/runs/irra-cuhk
#   # on the second, the same command with NODE_RANK=1
#
# Every argument goes to `tbps.trainer.train`. Environment:
#   NNODES, NODE_RANK    machines in all, this one's index (0 = the first; it hosts the
#                        rendezvous on MASTER_ADDR:MASTER_PORT, which every machine must reach)
#   MASTER_ADDR          the first machine's address; MASTER_PORT (default 29500)
#   GPUS_PER_NODE        ranks a machine (default 8)
#   ACCELERATE_CONFIG    default launch/accelerate/multinode_zero2.yaml; its num_machines,
#                        num_processes, machine_rank and main_process_ip are replaced by the above
# train.output_dir and the shards must be on a file system every machine shares. The machines
# start within train.collective_timeout_s of each other (the first waits for the rest).
# Stop: SIGTERM / SIGUSR1 / Ctrl-C to this script on ANY machine asks every rank of the run to
# checkpoint and stop (the ranks agree on the stop over the network); exit code 3, continue
# with the same command and train.resume=latest. NCCL settings: see launch/slurm.sh.
set -euo pipefail
: "${NNODES:?set NNODES (machines in all)}" "${NODE_RANK:?set NODE_RANK (0 on the first machine)}"
: "${MASTER_ADDR:?set MASTER_ADDR (the first machine address)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec python -m tbps.trainer.launch --config_file "${ACCELERATE_CONFIG:-launch/accelerate/multinode_zero2.yaml}" \
    --num_machines "$NNODES" --num_processes "$(( NNODES * GPUS_PER_NODE ))" \
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" \
    --main_process_port "${MASTER_PORT:-29500}" -m tbps.trainer.train "$@"
