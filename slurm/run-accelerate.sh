# The body shared by slurm/*.sbatch (sourced, not run): one fine-tuning run with DDP over every node of
# the allocation, `srun` starting ONE `accelerate launch` per node, which starts one process per GPU.
#
# Needs DEFAULT_JOB (set by the sbatch script) and the script's arguments: [JOB.toml] [launch/train.py
# options, e.g. --set KEY=VALUE ...]. Settings from the environment (all optional):
#   PROCS_PER_NODE  processes per node (default: the node's GPUs, $SLURM_GPUS_ON_NODE; 1 without GPUs)
#   ADVFT_CPU       1: CPU ranks over gloo (default: 1 when the node has no GPUs)
#   MASTER_PORT     rendezvous port on the first node (default: 20000 + job id mod 20000)
#   PYTHON          the python that has advft installed (default: .venv/bin/python if present, else python3)
#
# Requeue: SLURM sends USR1 to this shell (#SBATCH --signal=B:USR1@N) N seconds before the time limit.
# The trap creates a stop file that the ranks poll at log steps (ADVFT_STOP_FILE); they agree on a step,
# checkpoint and exit 75, and this script requeues the job (`scontrol requeue`). The next start resumes
# from the run folder on its own. The signal is not sent to the ranks themselves: it would reach the
# `accelerate launch` agents too, whose default action on USR1 is to die. Preemption sends SIGTERM to
# every process: the ranks (ADVFT_STOP_SIGNALS=TERM) checkpoint if the grace time allows, and SLURM
# requeues the job itself. Mixed precision: `--mixed_precision no`, because the run applies bf16
# autocast itself (run.precision in the job file); the launcher's own autocast would be a second one.
#
# CPUs: srun does not inherit the job's --cpus-per-task (Slurm >= 22.05), so on clusters that bind
# tasks to cores each node's ranks and loader threads would share ONE core; it is passed on here.
# The head: the ranks reach the first node at the address SLURM itself uses for it (its NodeAddr),
# since node names need not resolve; where they do, NodeAddr is the name or its address anyway.

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

JOB=$DEFAULT_JOB
if [[ $# -gt 0 && $1 != -* ]]; then
    JOB=$1
    shift
fi
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NNODES=${SLURM_NNODES:-1}
GPUS=${SLURM_GPUS_ON_NODE:-0}
PROCS_PER_NODE=${PROCS_PER_NODE:-$((GPUS > 0 ? GPUS : 1))}
NPROCS=$((NNODES * PROCS_PER_NODE))
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD=$(scontrol show node "$HEAD_NODE" -o | sed -n 's/.*\bNodeAddr=\([^ ]*\).*/\1/p')
HEAD=${HEAD:-$HEAD_NODE}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
if [[ ${ADVFT_CPU:-$((GPUS == 0 ? 1 : 0))} == 1 ]]; then
    export ACCELERATE_USE_CPU=1
fi

# One stop file per start of the job: a requeued start must not see the previous start's request.
# Global rank 0 runs on the first node, as this shell does, so a node-local path reaches it; the
# ranks agree on the stop step through an all-reduce, so the others need not see the file.
export ADVFT_STOP_FILE=${TMPDIR:-/tmp}/advft-stop-$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}
export ADVFT_STOP_SIGNALS=TERM
rm -f "$ADVFT_STOP_FILE"
stop_requested=0
trap 'stop_requested=1; touch "$ADVFT_STOP_FILE"; echo "[sbatch] USR1: time limit near, asking the run to checkpoint"' USR1
# Preempted or cancelled: keep waiting, so the ranks can finish their checkpoint within the grace time.
trap 'echo "[sbatch] TERM: preempted or cancelled"' TERM

echo "[sbatch] job $SLURM_JOB_ID (start ${SLURM_RESTART_COUNT:-0}): $JOB on $NNODES node(s) x $PROCS_PER_NODE" \
    "process(es), head $HEAD_NODE ($HEAD):$MASTER_PORT${ACCELERATE_USE_CPU:+, CPU/gloo}"

# Single quotes: SLURM_NODEID and the CPU count are expanded on each node, by that node's task.
# shellcheck disable=SC2016
srun --ntasks="$NNODES" --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    --kill-on-bad-exit=1 bash -c \
    'echo "[sbatch] node $SLURM_NODEID ($SLURMD_NODENAME): $(nproc) CPU(s) for its $5 process(es)"
     exec "$0" -m accelerate.commands.launch --multi_gpu --num_machines "$1" --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$2" --main_process_port "$3" --num_processes "$4" --mixed_precision no \
        --dynamo_backend no launch/train.py "${@:6}"' \
    "$PYTHON" "$NNODES" "$HEAD" "$MASTER_PORT" "$NPROCS" "$PROCS_PER_NODE" "$JOB" "$@" &
srun_pid=$!
set +e
# A trapped signal interrupts `wait` (status > 128) while srun runs on: wait again until it has ended.
while kill -0 "$srun_pid" 2> /dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?
set -e
rm -f "$ADVFT_STOP_FILE"

# The launcher turns the ranks' exit 75 into its own failure status, so the trap says why they stopped.
if ((rc != 0 && stop_requested)); then
    echo "[sbatch] the run checkpointed and stopped (status $rc); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[sbatch] srun ended with status $rc"
exit "$rc"
