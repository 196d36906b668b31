#!/usr/bin/env bash
# Debian's Slurm and MUNGE, for the tests that submit real batch jobs (tests/helpers/local_slurm.py starts a
# one-node cluster from them). Needs root and the Debian package mirror; does nothing when they are installed.
# Exits non-zero, saying why, when they are not there afterwards (.ci/run then stops).
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge)
tools=(sbatch slurmctld slurmd munged)
missing() {
    local tool
    for tool in "${tools[@]}"; do
        command -v "$tool" >/dev/null || { echo "$tool"; return 0; }
    done
    return 1
}
if ! missing >/dev/null; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install_slurm.sh: needs root and apt-get to install ${packages[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; then
    apt-get update -q >/dev/null || true
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null || true
fi
if tool=$(missing); then
    echo "install_slurm.sh: could not install ${packages[*]} ($tool is missing afterwards; see apt-get's messages)" >&2
    exit 1
fi
echo "install_slurm.sh: installed ${packages[*]}"
