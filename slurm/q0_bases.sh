#!/usr/bin/env bash
# One q0 base per SLURM array task; base index = SLURM_ARRAY_TASK_ID.
#
#   slurm/submit.sh CONFIG                        # usual way: adds GPUs/CPUs, logs dir, the prior job
#   sbatch --array=0-4 --gpus-per-node=8 --cpus-per-task=64 slurm/q0_bases.sh CONFIG [key=value ...]
#   Q0DS_CPU=1 sbatch --array=0-1 --cpus-per-task=1 slurm/q0_bases.sh CONFIG     # CPU ranks (tests, laptops)
#
# Each task runs `deepspeed launchers/train.py --config CONFIG --base B [key=value ...]` from the project
# dir. Requeued or resubmitted tasks run the same command, and the trainer resumes from its newest checkpoint.
#
# Environment (all optional except the config):
#   Q0DS_CONFIG          run config (or the first argument); relative paths are taken from the submit dir
#   Q0DS_OVERRIDES       extra key=value overrides, space separated (appended after the arguments)
#   Q0DS_ROOT            project dir holding launchers/train.py (default: the submit dir)
#   Q0DS_PYTHON          python with q0ds + deepspeed (default: python); deepspeed is taken from its bin dir
#   Q0DS_CPU             1: CPU ranks (DS_ACCELERATOR=cpu); 0: GPUs; unset: GPUs if the job has any or
#                        nvidia-smi exists, else CPU
#   Q0DS_GPUS_PER_NODE   ranks per node (default: SLURM_GPUS_ON_NODE, else 8 on GPUs, 1 on CPU)
#   Q0DS_MASTER_PORT     rendezvous port (default: 20000 + (array job id * 17 + task id) % 10000, so tasks
#                        sharing a node differ; 20000-29999 stays below Linux's ephemeral port range)
#   Q0DS_USE_SRUN        1: start the launcher through srun even on one node (multi-node always does)
#   Q0DS_BASE            base index when not submitted as an array
#   Q0DS_RESEND_SECONDS  repeat a forwarded SIGUSR1 this often until the launcher exits (default 30)
#
# GPUs and CPUs are not in the header: an #SBATCH --gpus-per-node cannot be undone from the command line on
# a cluster without GPUs (`--gpus-per-node=0` is rejected there), so submit.sh adds them (unless Q0DS_CPU=1).
#
# Pre-emption. --signal=B:USR1@300 makes SLURM send SIGUSR1 to this batch shell only (not its children)
# about 300 s before the time limit; `scancel --signal=USR1 --batch JOB` does the same by hand. The shell
# must hand it to the trainer ranks, and the deepspeed launchers in between are in the way:
#   - `deepspeed` (runner.py) installs no signal handlers on one node, so SIGUSR1 or SIGTERM would kill it
#     and orphan everything below it;
#   - deepspeed.launcher.launch handles SIGINT/SIGTERM by terminating all ranks (30 s grace, then SIGKILL)
#     and has no SIGUSR1 handler, so SIGUSR1 would kill it too.
# So the launcher is started in the background in its own session/process group (setsid) with SIGUSR1 and
# SIGTERM ignored; ignored signals stay ignored across exec, so runner.py never dies of them and launch.py
# not of SIGUSR1 (its own SIGTERM handler still runs), while the trainer installs its own handlers
# (signal.signal overrides SIG_IGN). The trap below forwards
# SIGUSR1/SIGTERM to that whole process group: launchers ignore it, ranks set their flag, all ranks agree
# at the next step, write a checkpoint and exit 75; launch.py and runner.py pass 75 up. On exit 75 after
# SIGUSR1 we `scontrol requeue` this task: SLURM kills the job and starts it again (Restarts=1, after a
# BeginTime hold of about two minutes), and the same command resumes.
# When one rank exits non-zero, launch.py SIGTERMs the other ranks (SIGKILL after 30 s), so all ranks must
# have finished the collective checkpoint before any of them exits (the trainer agrees on the step with
# an all-reduce and saves together; SIGTERM to a rank only sets its flag). On SIGTERM launch.py itself
# exits 1, not 75. SIGUSR1 that arrives while ranks still start up (before their handler exists) is
# ignored, so the trap repeats it every Q0DS_RESEND_SECONDS (30) until the launcher exits.
# We never requeue after SIGTERM: that is scancel, the time limit, or SLURM's own pre-emption (which
# requeues by itself); a requeue from inside a cancelled job brings the job back, which we saw happen.
# On several nodes, srun starts this script once per node (--node-launch); srun forwards SIGUSR1/SIGTERM
# to those tasks, and each forwards it to its local launcher group in the same way.
#SBATCH --job-name=q0-bases
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=q0-bases-%A_%a.out
set -euo pipefail

EXIT_PREEMPTED=75   # the trainer's "checkpoint written, relaunch to continue" (EX_TEMPFAIL)

say() { echo "q0_bases [$(date '+%F %T')]: $*"; }
die() { echo "q0_bases: ERROR: $*" >&2; exit 1; }

# job_hosts LIST: the job's host names, one a line. scontrol expands SLURM's compressed form (node[01-04]);
# where there is no scontrol, or one that cannot reach a SLURM configuration (a node launch started by hand
# or by a test on a machine with SLURM's client installed but no cluster), a plain comma list is used as is.
job_hosts() {
    local out
    if command -v scontrol >/dev/null && out=$(scontrol show hostnames "$1" 2>/dev/null) && [[ -n $out ]]; then
        echo "$out"
        return 0
    fi
    [[ $1 != *[* ]] || die "cannot expand the node list '$1' (no working scontrol); give the host names separated by commas"
    tr ',' '\n' <<<"$1"
}

# --- signal forwarding (see the header) -------------------------------------------------------------
CHILD=""        # pid of the launcher = its process group id (setsid)
RESENDER=""     # background loop repeating SIGUSR1 (see below)
GOT_USR1=0
GOT_TERM=0
RESEND_SECONDS=${Q0DS_RESEND_SECONDS:-30}
forward() {
    local sig=$1
    if [[ $sig == USR1 ]]; then GOT_USR1=1; else GOT_TERM=1; fi
    say "got SIG$sig; forwarding it to the launcher process group ${CHILD:-(not started yet)}"
    [[ -n $CHILD ]] || return 0
    kill -s "$sig" -- "-$CHILD" 2>/dev/null || kill -s "$sig" "$CHILD" 2>/dev/null || true
    # Ranks ignore SIGUSR1 until the trainer installs its handler, so a signal during start-up would be
    # lost (seen with --time=2 --signal=B:USR1@100: it came 13 s after the start). Repeat it every
    # RESEND_SECONDS until the launcher exits; the trainer's handler only sets a flag, so repeats are harmless.
    if [[ $sig == USR1 && -z $RESENDER ]]; then
        (while sleep "$RESEND_SECONDS"; do kill -s USR1 -- "-$CHILD" 2>/dev/null || exit 0; done) &
        RESENDER=$!
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# run_forwarding CMD...: run CMD in its own process group with SIGUSR1/SIGTERM ignored, forward those
# signals to it, and return its exit status.
run_forwarding() {
    (trap '' USR1 TERM && exec setsid "$@") &
    CHILD=$!
    # a signal that came before the launcher existed is passed on now (ranks inherit SIG_IGN until the
    # trainer installs its handlers, so a very early signal can still be lost; SLURM's comes 300 s early)
    if ((GOT_USR1)); then forward USR1; fi
    if ((GOT_TERM)); then forward TERM; fi
    local rc=0
    wait "$CHILD" || rc=$?
    # a trapped signal interrupts `wait` (status > 128); wait again while the launcher lives
    while kill -0 "$CHILD" 2>/dev/null; do
        rc=0
        wait "$CHILD" || rc=$?
    done
    # bash remembers the status of reaped background jobs: ask once more in case `wait` was interrupted
    local final=0
    wait "$CHILD" 2>/dev/null || final=$?
    ((final == 127)) || rc=$final
    if [[ -n $RESENDER ]]; then  # stop its sleep first: the loop then ends by itself
        pkill -P "$RESENDER" 2>/dev/null || true
        kill "$RESENDER" 2>/dev/null || true
    fi
    return "$rc"
}

# --- per-node launch under srun (multi-node, or Q0DS_USE_SRUN=1) ------------------------------------
if [[ ${1:-} == --node-launch ]]; then
    # args: --node-launch DEEPSPEED RANKS_PER_NODE NNODES MASTER PORT SCRIPT [script args...]
    shift
    ds=$1 ranks=$2 nnodes=$3 master=$4 port=$5
    shift 5
    hostfile="${TMPDIR:-/tmp}/q0ds-hostfile-${SLURM_JOB_ID}-${SLURM_NODEID}"
    hosts=$(job_hosts "$SLURM_JOB_NODELIST") || exit 1
    sed "s/\$/ slots=$ranks/" <<<"$hosts" >"$hostfile"
    rc=0
    run_forwarding "$ds" --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" --num_nodes "$nnodes" \
        --num_gpus "$ranks" --master_addr "$master" --master_port "$port" "$@" || rc=$?
    rm -f "$hostfile"
    exit "$rc"
fi

# --- configuration -----------------------------------------------------------------------------------
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
CONFIG=${Q0DS_CONFIG:-}
if [[ $# -gt 0 && $1 != *=* ]]; then
    CONFIG=$1
    shift
fi
OVERRIDES=("$@")
if [[ -n ${Q0DS_OVERRIDES:-} ]]; then
    read -r -a extra <<<"$Q0DS_OVERRIDES"
    OVERRIDES+=("${extra[@]}")
fi
[[ -n $CONFIG ]] || die "no run config: pass it as the first argument or set Q0DS_CONFIG"
[[ $CONFIG == /* ]] || CONFIG="$SUBMIT_DIR/$CONFIG"
[[ -f $CONFIG ]] || die "run config not found: $CONFIG"

ROOT=${Q0DS_ROOT:-$SUBMIT_DIR}
[[ -f $ROOT/launchers/train.py ]] || die "$ROOT is not the q0ds project (no launchers/train.py); set Q0DS_ROOT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -t 1 ]] || export Q0DS_NO_PROGRESS=${Q0DS_NO_PROGRESS:-1}   # no progress bars in log files

PY=${Q0DS_PYTHON:-python}
command -v "$PY" >/dev/null || die "python not found: $PY (set Q0DS_PYTHON)"
"$PY" -c "import q0ds" || die "$PY cannot import q0ds (set Q0DS_PYTHON to the project's venv python)"
DS="$(dirname "$(command -v "$PY")")/deepspeed"
[[ -x $DS ]] || DS=$(command -v deepspeed) || die "deepspeed not found next to $PY or on PATH"

BASE=${SLURM_ARRAY_TASK_ID:-${Q0DS_BASE:-}}
[[ $BASE =~ ^[0-9]+$ ]] || die "no base index: submit as an array (--array=0-N) or set Q0DS_BASE"

config_get() { "$PY" -m q0ds.cli config-get --config "$CONFIG" "$1" "${OVERRIDES[@]}"; }
RUN_DIR=$(config_get run_dir) || die "cannot read run_dir from $CONFIG"
NBASES=$(config_get bases) || die "cannot read bases from $CONFIG"
[[ $NBASES =~ ^[0-9]+$ ]] || die "config-get bases printed '$NBASES', not a count"
((BASE < NBASES)) || die "array task $BASE is out of range: the config has $NBASES bases (0-$((NBASES - 1)))"

# --- resources -----------------------------------------------------------------------------------------
if [[ -z ${Q0DS_CPU:-} ]]; then
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]] || command -v nvidia-smi >/dev/null; then Q0DS_CPU=0; else Q0DS_CPU=1; fi
fi
if [[ $Q0DS_CPU == 1 ]]; then
    export DS_ACCELERATOR=cpu
    RANKS=${Q0DS_GPUS_PER_NODE:-1}
    DEVICE="CPU ranks"
else
    RANKS=${Q0DS_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    DEVICE="GPUs"
fi
[[ $RANKS =~ ^[1-9][0-9]*$ ]] || die "bad ranks per node: '$RANKS' (Q0DS_GPUS_PER_NODE / SLURM_GPUS_ON_NODE)"
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
    cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
    export OMP_NUM_THREADS=$((cpus / RANKS > 0 ? cpus / RANKS : 1))
fi
# Collective wait bound, minutes (DeepSpeed's default 10, deepspeed/constants.py default_pg_timeout): rank 0
# writes and hashes a snapshot (~3.5 GB at 1.8B) while the other ranks wait in the next collective.
export DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-60}
if [[ $Q0DS_CPU == 0 && -z ${TORCH_EXTENSIONS_DIR:-} ]]; then
    # JIT-built ops (FusedAdam unless prebuilt with DS_BUILD_FUSED_ADAM=1 pip install deepspeed) go to a
    # node-local cache, not a shared home dir that every node and rank would compile into at once
    export TORCH_EXTENSIONS_DIR=${TMPDIR:-/tmp}/q0ds-torch-extensions-${USER:-$(id -u)}
fi

NNODES=${SLURM_JOB_NUM_NODES:-1}
mapfile -t HOSTS < <(job_hosts "${SLURM_JOB_NODELIST:-$(hostname -s)}")
[[ ${#HOSTS[@]} -gt 0 && -n ${HOSTS[0]} ]] || die "no host names for the node list '${SLURM_JOB_NODELIST:-}'"
MASTER=${HOSTS[0]}
JOB_KEY=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-$$}}
PORT=${Q0DS_MASTER_PORT:-$((20000 + (JOB_KEY * 17 + BASE) % 10000))}
if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
    JOB_REF="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
else
    JOB_REF=${SLURM_JOB_ID:-}
fi

BASE_DIR=$(printf '%s/bases/base-%02d' "$RUN_DIR" "$BASE")
shopt -s nullglob
SNAPS=("$BASE_DIR"/snapshots/cycle-*/)
NSNAP=${#SNAPS[@]}
shopt -u nullglob
# the newest complete checkpoint: the trainer marks one with q0ds_complete.json once every rank wrote it
LATEST=""
shopt -s nullglob
for marker in "$BASE_DIR"/checkpoints/step-*/q0ds_complete.json; do LATEST=$(basename "$(dirname "$marker")"); done
shopt -u nullglob
if [[ -f $BASE_DIR/done.json ]]; then
    RESUME="base already complete ($NSNAP snapshots)"
elif [[ -n $LATEST ]]; then
    RESUME="resuming from checkpoint $LATEST ($NSNAP snapshots so far)"
elif [[ -d $BASE_DIR/checkpoints ]]; then
    RESUME="checkpoint dir exists ($NSNAP snapshots so far); the trainer picks the newest complete one"
else
    RESUME="fresh start"
fi

TRAIN=(launchers/train.py --config "$CONFIG" --base "$BASE" "${OVERRIDES[@]}")
if ((NNODES > 1)) || [[ ${Q0DS_USE_SRUN:-0} == 1 ]]; then
    # one launcher per node; srun does not pass --cpus-per-task on to the step in SLURM 22.05, so say it
    CMD=(srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
        --kill-on-bad-exit=1 bash "$ROOT/slurm/q0_bases.sh" --node-launch "$DS" "$RANKS" "$NNODES" "$MASTER"
        "$PORT" "${TRAIN[@]}")
elif [[ $Q0DS_CPU != 1 && -n ${CUDA_VISIBLE_DEVICES:-} && -z ${Q0DS_GPUS_PER_NODE:-} ]]; then
    # deepspeed drops CUDA_VISIBLE_DEVICES when given --num_gpus; without it, it uses exactly those GPUs
    CMD=("$DS" --master_port "$PORT" "${TRAIN[@]}")
else
    CMD=("$DS" --num_gpus "$RANKS" --master_port "$PORT" "${TRAIN[@]}")
fi

cat <<EOF
==================================================================== q0_bases
job         ${SLURM_JOB_ID:-none} (${JOB_REF:-not under SLURM}), restart ${SLURM_RESTART_COUNT:-0}
base        $BASE of $NBASES
nodes       $NNODES: ${HOSTS[*]}  (master $MASTER:$PORT)
devices     $RANKS $DEVICE per node, ${SLURM_CPUS_PER_TASK:-?} CPUs per node, OMP_NUM_THREADS=$OMP_NUM_THREADS, DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT}m
config      $CONFIG ${OVERRIDES[*]}
run dir     $RUN_DIR
resume      $RESUME
project     $ROOT   python $PY
command     ${CMD[*]}
=============================================================================
EOF

rc=0
run_forwarding "${CMD[@]}" || rc=$?

if ((rc == 0)); then
    say "base $BASE complete"
    exit 0
fi
if ((rc == EXIT_PREEMPTED)) && ((GOT_TERM == 0)); then
    [[ -n $JOB_REF ]] || die "trainer checkpointed for pre-emption (exit 75) but this is not a SLURM job"
    say "checkpoint written after SIGUSR1; requeueing $JOB_REF to resume"
    if scontrol requeue "$JOB_REF"; then
        exit 0   # SLURM now ends this run of the job and starts it again
    fi
    die "scontrol requeue $JOB_REF failed; resubmit task $BASE (it resumes from the checkpoint)"
fi
if ((GOT_TERM)); then
    say "stopped by SIGTERM (scancel, time limit or pre-emption); launcher exit $rc; not requeueing"
    exit "$rc"
fi
die "trainer failed with exit code $rc (base $BASE); see the log above"
