#!/usr/bin/env bash
# Submit a whole q0 run to SLURM: an array with one task per base, then the prior/eval/report job that
# starts only when every base task succeeded (afterok).
#
#   slurm/submit.sh CONFIG [sbatch options...]          # options go to both jobs, e.g. -p gpu -A myacct
#   Q0DS_CPU=1 slurm/submit.sh CONFIG                   # CPU ranks, no GPU request (local test cluster)
#
# Prints "<bases job id> <prior job id>" on stdout; everything else goes to stderr. Logs go to RUN/logs/.
# Environment:
#   Q0DS_CPU=1               CPU ranks: no --gpus-per-node; --cpus-per-task = ranks per node
#   Q0DS_GPUS_PER_NODE       GPUs (or CPU ranks) per base (default 8 on GPUs, 1 on CPU)
#   Q0DS_CPUS_PER_TASK       CPUs per base (default 8 per GPU on GPUs; = ranks on CPU)
#   Q0DS_MEM                 host memory per node (sbatch --mem; default 0 = all of the node's on GPUs, none
#                            requested on CPU). One 1.8B base needs ~100 GB host RAM for 8 ranks + checkpoints.
#   Q0DS_SBATCH_BASES_ARGS   extra sbatch args for the bases array only (e.g. "--time=48:00:00 --nodes=2")
#   Q0DS_SBATCH_PRIOR_ARGS   extra sbatch args for the prior job only
#   Q0DS_PYTHON, Q0DS_OVERRIDES, Q0DS_ROOT   passed on to the jobs (see slurm/q0_bases.sh)
# The GPU request is made here, not in q0_bases.sh's #SBATCH header, because a header --gpus-per-node cannot
# be undone from the command line on a cluster without GPUs (SLURM rejects --gpus-per-node=0 there).
set -euo pipefail

die() { echo "submit: ERROR: $*" >&2; exit 1; }
say() { echo "submit: $*" >&2; }

[[ $# -ge 1 && $1 != -* ]] || die "usage: slurm/submit.sh CONFIG [sbatch options...]"
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "run config not found: $CONFIG (nothing submitted)"
CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

ROOT=${Q0DS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[[ -f $ROOT/launchers/train.py ]] || die "$ROOT is not the q0ds project (no launchers/train.py); set Q0DS_ROOT"
export Q0DS_ROOT=$ROOT Q0DS_CONFIG=$CONFIG
command -v sbatch >/dev/null || die "sbatch not found: is this a SLURM login node? (slurm/local_cluster.sh start for a local one)"

PY=${Q0DS_PYTHON:-python}
command -v "$PY" >/dev/null || die "python not found: $PY (set Q0DS_PYTHON)"
# the jobs run q0ds with this python: check it imports before blaming the config or submitting anything
err=$(cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import q0ds.cli, deepspeed" 2>&1 >/dev/null) ||
    die "$PY cannot import q0ds and deepspeed (${err##*$'\n'}); set Q0DS_PYTHON to the python of the q0ds venv (nothing submitted)"
OVERRIDES=()
if [[ -n ${Q0DS_OVERRIDES:-} ]]; then read -r -a OVERRIDES <<<"$Q0DS_OVERRIDES"; fi
config_get() { (cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m q0ds.cli config-get --config "$CONFIG" "$1" "${OVERRIDES[@]}"); }
NBASES=$(config_get bases) || die "cannot read bases from $CONFIG (nothing submitted)"
[[ $NBASES =~ ^[1-9][0-9]*$ ]] || die "config-get bases printed '$NBASES', not a positive count (nothing submitted)"
RUN_DIR=$(config_get run_dir) || die "cannot read run_dir from $CONFIG (nothing submitted)"
mkdir -p "$RUN_DIR/logs"

if [[ ${Q0DS_CPU:-0} == 1 ]]; then
    RANKS=${Q0DS_GPUS_PER_NODE:-1}
    RESOURCES=(--cpus-per-task="${Q0DS_CPUS_PER_TASK:-$RANKS}")
    if [[ -n ${Q0DS_MEM:-} ]]; then RESOURCES+=(--mem="$Q0DS_MEM"); fi
    KIND="CPU ranks"
else
    RANKS=${Q0DS_GPUS_PER_NODE:-8}
    RESOURCES=(--gpus-per-node="$RANKS" --cpus-per-task="${Q0DS_CPUS_PER_TASK:-$((8 * RANKS))}" --mem="${Q0DS_MEM:-0}")
    KIND="GPUs"
fi
BASES_EXTRA=() PRIOR_EXTRA=()
if [[ -n ${Q0DS_SBATCH_BASES_ARGS:-} ]]; then read -r -a BASES_EXTRA <<<"$Q0DS_SBATCH_BASES_ARGS"; fi
if [[ -n ${Q0DS_SBATCH_PRIOR_ARGS:-} ]]; then read -r -a PRIOR_EXTRA <<<"$Q0DS_SBATCH_PRIOR_ARGS"; fi

# later options win, so: our defaults, then the per-job env args, then the command line
bases_out=$(sbatch --parsable --array="0-$((NBASES - 1))" "${RESOURCES[@]}" \
    --output="$RUN_DIR/logs/q0-bases-%A_%a.out" "${BASES_EXTRA[@]}" "$@" \
    "$ROOT/slurm/q0_bases.sh" "$CONFIG") || die "sbatch of the bases array failed (nothing submitted)"
BASES_JOB=${bases_out%%;*}
say "bases: array job $BASES_JOB, tasks 0-$((NBASES - 1)), $RANKS $KIND each; logs $RUN_DIR/logs/q0-bases-${BASES_JOB}_<task>.out"

prior_out=$(sbatch --parsable --dependency="afterok:$BASES_JOB" --kill-on-invalid-dep=yes \
    --output="$RUN_DIR/logs/q0-prior-%j.out" "${PRIOR_EXTRA[@]}" "$@" \
    "$ROOT/slurm/q0_prior.sh" "$CONFIG") || {
    scancel "$BASES_JOB" || true
    die "sbatch of the prior job failed; cancelled the bases array $BASES_JOB"
}
PRIOR_JOB=${prior_out%%;*}
say "prior: job $PRIOR_JOB after all of $BASES_JOB succeed; log $RUN_DIR/logs/q0-prior-$PRIOR_JOB.out"
echo "$BASES_JOB $PRIOR_JOB"
