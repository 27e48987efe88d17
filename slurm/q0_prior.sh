#!/usr/bin/env bash
# Fit the learned prior, evaluate the top-K mixtures and write the report for one run, after all bases.
#
#   slurm/submit.sh CONFIG                                    # submits this with --dependency=afterok:<bases>
#   sbatch --dependency=afterok:123 slurm/q0_prior.sh CONFIG  # by hand
#
# Runs `python -m q0ds.cli fit-prior|eval|report --run RUN_DIR`; RUN_DIR comes from the config
# (`q0ds config-get`). Works from the stored per-token probabilities of each snapshot, so CPU is enough.
# Environment: Q0DS_CONFIG (or the first argument), Q0DS_OVERRIDES, Q0DS_ROOT, Q0DS_PYTHON as in q0_bases.sh.
#SBATCH --job-name=q0-prior
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=q0-prior-%j.out
set -euo pipefail

say() { echo "q0_prior [$(date '+%F %T')]: $*"; }
die() { echo "q0_prior: ERROR: $*" >&2; exit 1; }

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
[[ -d $ROOT/q0ds ]] || die "$ROOT is not the q0ds project (no q0ds/); set Q0DS_ROOT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -t 1 ]] || export Q0DS_NO_PROGRESS=${Q0DS_NO_PROGRESS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
PY=${Q0DS_PYTHON:-python}
command -v "$PY" >/dev/null || die "python not found: $PY (set Q0DS_PYTHON)"
"$PY" -c "import q0ds" || die "$PY cannot import q0ds (set Q0DS_PYTHON to the project's venv python)"

config_get() { "$PY" -m q0ds.cli config-get --config "$CONFIG" "$1" "${OVERRIDES[@]}"; }
RUN_DIR=$(config_get run_dir) || die "cannot read run_dir from $CONFIG"
NBASES=$(config_get bases) || die "cannot read bases from $CONFIG"
[[ $NBASES =~ ^[0-9]+$ ]] || die "config-get bases printed '$NBASES', not a count"

# Every base must have finished snapshots; name the ones that do not.
missing=()
nsnap=0
shopt -s nullglob
for ((b = 0; b < NBASES; b++)); do
    dir=$(printf '%s/bases/base-%02d' "$RUN_DIR" "$b")
    snaps=("$dir"/snapshots/cycle-*/snapshot.json)
    if ((${#snaps[@]} == 0)); then missing+=("base-$(printf %02d "$b")"); fi
    nsnap=$((nsnap + ${#snaps[@]}))
done
shopt -u nullglob
if ((${#missing[@]})); then
    die "no snapshots for ${missing[*]} in $RUN_DIR/bases: did those array tasks finish? (see their logs)"
fi

cat <<EOF
==================================================================== q0_prior
job         ${SLURM_JOB_ID:-not under SLURM}, restart ${SLURM_RESTART_COUNT:-0}
config      $CONFIG ${OVERRIDES[*]}
run dir     $RUN_DIR ($NBASES bases, $nsnap snapshots)
project     $ROOT   python $PY
=============================================================================
EOF

for step in fit-prior eval report; do
    say "q0ds $step --run $RUN_DIR"
    t0=$SECONDS
    "$PY" -m q0ds.cli "$step" --run "$RUN_DIR" || die "q0ds $step failed (exit $?)"
    say "$step done in $((SECONDS - t0)) s"
done
say "prior, eval and report written to $RUN_DIR"
