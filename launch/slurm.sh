#!/usr/bin/env bash
# SLURM: one task per node, each starting `accelerate launch` for its GPUs.
#   sbatch --nodes 2 --gpus-per-node 8 --signal=USR1@120 launch/slurm.sh \
#       --config launch/configs/irra.yaml data.shards=shards/cuhk train.output_dir=runs/irra-cuhk
# --signal=USR1@120 asks the trainer to checkpoint and stop two minutes before the time limit;
# resubmit with train.resume=latest to continue.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file launch/accelerate/multinode_zero2.yaml \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $HEAD --main_process_port 29500 \
    -m trainer.train $*"
