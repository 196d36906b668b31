#!/usr/bin/env bash
# Debian's Slurm and MUNGE, for the tests that submit real batch jobs (tests/helpers/local_slurm.py starts a
# one-node cluster from them). Needs root and the Debian package mirror; does nothing when they are installed.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge)
if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: needs root and apt-get to install ${packages[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; }
echo "install_slurm.sh: installed ${packages[*]}"
