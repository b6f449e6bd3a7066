#!/bin/bash
# Build the pipeline's Apptainer image from container/pipeline.def (Apptainer >= 1.2; network at build time).
#   bash container/build.sh [--weightless] [--output FILE] [-- extra apptainer build options]
# The image gets the committed tree plus uncommitted changes of tracked files (git ls-files; outputs,
# caches and untracked files stay out) at /opt/src, the project installed from requirements.lock, and,
# unless --weightless, Pythia-1.4B at the revision pinned in the definition (= profiles/cluster.yaml).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUTPUT="$REPO/container/pipeline.sif"
WITH_MODEL=1
while [[ $# -gt 0 ]]; do
    case $1 in
        --weightless) WITH_MODEL=0; OUTPUT="$REPO/container/pipeline-weightless.sif"; shift ;;
        --output) OUTPUT=$(realpath -m "$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [--weightless] [--output FILE] [-- apptainer build options]" >&2; exit 2 ;;
    esac
done
APPTAINER=$(command -v apptainer || command -v singularity) \
    || { echo "apptainer not found: install Apptainer >= 1.2 (https://apptainer.org/docs/admin/main/installation.html)" >&2; exit 1; }

CONTEXT=$(mktemp -d "${TMPDIR:-/tmp}/pipeline-build.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
mkdir "$CONTEXT/src"
(cd "$REPO" && git ls-files -z | grep -zv '^outputs/' | xargs -0 cp --parents -t "$CONTEXT/src")
cp "$REPO/container/pipeline.def" "$CONTEXT/"

echo "building $OUTPUT (WITH_MODEL=$WITH_MODEL) from $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet || echo -dirty)"
cd "$CONTEXT"
"$APPTAINER" build --force --build-arg "WITH_MODEL=$WITH_MODEL" "$@" "$OUTPUT" pipeline.def
"$APPTAINER" inspect --labels "$OUTPUT"
echo "built $OUTPUT; test it: $APPTAINER test --nv $OUTPUT"
