# The interpreter the Slurm scripts run (sourced by slurm/train.sbatch and slurm/train_deepspeed.sbatch, with REPO
# set): BIGTRAIN_PYTHON when set, else the project's own .venv (what `make setup` creates), else `python`. One that
# cannot import what bigtrain needs stops the job at once, in one paragraph, before any rank starts.
if [ -n "${BIGTRAIN_PYTHON:-}" ]; then
    PYTHON=$BIGTRAIN_PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON=$REPO/.venv/bin/python
else
    PYTHON=python
fi
if ! "$PYTHON" -c "import torch, yaml, deepspeed" 2>/dev/null; then
    echo "bigtrain: error: $PYTHON cannot import torch, yaml and deepspeed, which bigtrain needs. Run" \
         "\`make setup\` in $REPO (it creates $REPO/.venv, which these scripts then use), or set BIGTRAIN_PYTHON" \
         "to an interpreter that has them (docs/slurm.md)." >&2
    exit 2
fi
