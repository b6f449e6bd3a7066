#!/usr/bin/env bash
# Debian's slurm-wlm and munge, non-interactively, for the SLURM tests (tests/slurm_harness.py starts
# the daemons itself, with every file in a temp dir; nothing here is started or enabled). Needs root.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "install-slurm: slurm-wlm and munge already installed"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
echo "install-slurm: $(slurmctld -V), $(munged --version 2>&1 | head -1)"
