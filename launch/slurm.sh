#!/usr/bin/env bash
# SLURM batch script: N nodes x G GPUs, one `tbps launch` (accelerate launch) per
# node, each starting that node's G ranks; the first node hosts the rendezvous.
#
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh \
#       --config launch/configs/irra.yaml data.shards=shards/cuhk train.output_dir=runs/irra-cuhk
#
# Every argument goes to `tbps.trainer.train`; train.resume=auto is added, so the same command starts
# the run or continues it from its newest complete checkpoint (train.output_dir and the shards
# must be on a file system all nodes share). Environment (optional):
#   ACCELERATE_CONFIG  accelerate config (default launch/accelerate/multinode_zero2.yaml); its
#                      num_machines / num_processes / machine_rank / main_process_ip are
#                      replaced by SLURM's values
#   GPUS_PER_NODE      ranks a node (default: SLURM_GPUS_ON_NODE, else 8)
#   MASTER_PORT        rendezvous port on the first node (default 29500 + job id % 1000)
#   REQUEUE=0          do not requeue the job after a stop at the time limit
#
# Time limit: --signal=USR1@600 makes SLURM send SIGUSR1 to every process of the job step ten
# minutes before the limit. tbps.trainer.launch (and every rank, which may get it directly) turns it
# into a stop request: the ranks agree on a step within two steps, write a checkpoint and exit 3
# (leave enough time for an epoch's evaluation plus a checkpoint write). The job then requeues
# itself (exit code 3 from srun) and continues where it stopped. A rank that dies or hangs ends
# the run with exit 1 after train.collective_timeout_s (no requeue: look at the log first).
#
# NCCL (exported below only where unset; see the NCCL docs for your fabric):
#   TORCH_NCCL_ASYNC_ERROR_HANDLING=1  a failed or timed-out collective aborts the process
#                                      instead of hanging (torch's default; set for old ones)
#   NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME  the interface the nodes reach each other on when
#                                      there are several (e.g. ib0 or eth0; "^lo,docker" keeps
#                                      loopback and container bridges out); gloo carries the
#                                      trainer's stop flag, so give both
#   NCCL_IB_HCA=mlx5 / NCCL_IB_DISABLE=1  pick the InfiniBand adapters / force TCP without IB
#   NCCL_DEBUG=INFO                    to see which transport NCCL chose (WARN by default here)
#SBATCH --job-name=tbps
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/accelerate/multinode_zero2.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${SLURM_NNODES:?run this through sbatch (SLURM_NNODES is not set)}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)   # sed reads all: no SIGPIPE
export MASTER_ADDR=$HEAD
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE} / GPUS_PER_NODE ))}
[ "$OMP_NUM_THREADS" -ge 1 ] || export OMP_NUM_THREADS=1

echo "slurm.sh: job ${SLURM_JOB_ID} on ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), head ${HEAD}:${MASTER_PORT}, ${ACCELERATE_CONFIG}"
# one task a node; SLURM_NODEID (0..N-1) is read inside the task, on its own node
srun --ntasks-per-node=1 --kill-on-bad-exit=0 bash -c '
    exec python -m tbps.trainer.launch --config_file "$0" \
        --num_machines "$SLURM_NNODES" --num_processes "$(( SLURM_NNODES * $1 ))" \
        --machine_rank "$SLURM_NODEID" --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" -m tbps.trainer.train "${@:2}" train.resume=auto' \
    "$ACCELERATE_CONFIG" "$GPUS_PER_NODE" "$@" &
STEP=$!
# SLURM signals the step itself; a signal to this script (scancel --batch, a manual kill) is
# passed on as a stop request too
trap 'kill -USR1 "$STEP" 2>/dev/null || true' USR1 TERM
rc=0
while true; do
    wait "$STEP" && rc=0 || rc=$?
    kill -0 "$STEP" 2>/dev/null || break      # wait returned for a signal: wait again
done
if [ "$rc" -eq 3 ] && [ "${REQUEUE:-1}" = 1 ]; then
    echo "slurm.sh: stopped with a checkpoint; requeueing job ${SLURM_JOB_ID} to continue"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
