#!/bin/bash
# Build the pipeline's Apptainer image from container/pipeline.def (Apptainer >= 1.2; network at build time).
#   bash container/build.sh [--weightless] [--output FILE] [-- extra apptainer build options]
# The image gets exactly the committed tree (`git archive HEAD`: uncommitted changes, untracked files and
# outputs stay out) at /opt/src, the project installed from requirements.lock, and, unless --weightless,
# Pythia-1.4B at the revision pinned in the definition (= profiles/cluster.yaml). Apptainer's layer cache
# and build directory go to scratch ($APPTAINER_CACHEDIR / $APPTAINER_TMPDIR, default under $SCRATCH), not
# $HOME. Rehearse the definition without Apptainer (as root): python3 container/rehearse.py build
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
if [[ -z ${APPTAINER_CACHEDIR:-} || -z ${APPTAINER_TMPDIR:-} ]]; then
    [[ -n ${SCRATCH:-} ]] || { echo "set SCRATCH (or APPTAINER_CACHEDIR and APPTAINER_TMPDIR): the build needs ~15 GB off \$HOME" >&2; exit 1; }
fi
export APPTAINER_CACHEDIR=${APPTAINER_CACHEDIR:-$SCRATCH/apptainer/cache}
export APPTAINER_TMPDIR=${APPTAINER_TMPDIR:-$SCRATCH/apptainer/tmp}
mkdir -p "$APPTAINER_CACHEDIR" "$APPTAINER_TMPDIR"

COMMIT=$(git -C "$REPO" rev-parse HEAD)
git -C "$REPO" diff --quiet HEAD || echo "WARNING: uncommitted changes are NOT in the image (it holds commit $COMMIT)" >&2
CONTEXT=$(mktemp -d "$APPTAINER_TMPDIR/pipeline-build.XXXXXX")
trap 'rm -rf "$CONTEXT"' EXIT
mkdir "$CONTEXT/src"
git -C "$REPO" archive --format=tar HEAD | tar -x -C "$CONTEXT/src"
cp "$CONTEXT/src/container/pipeline.def" "$CONTEXT/"

echo "building $OUTPUT (WITH_MODEL=$WITH_MODEL) from commit $COMMIT; cache $APPTAINER_CACHEDIR, tmp $APPTAINER_TMPDIR"
cd "$CONTEXT"
"$APPTAINER" build --force --build-arg "WITH_MODEL=$WITH_MODEL" --build-arg "GIT_COMMIT=$COMMIT" "$@" "$OUTPUT" pipeline.def
echo "built $OUTPUT"
echo "  sha256 $(sha256sum "$OUTPUT" | cut -d' ' -f1)"
"$APPTAINER" inspect --labels "$OUTPUT" | grep -E '(torch\.build|model\.revision|model\.baked|source\.commit|base\.image\.[a-z]+)' | sed 's/^/  /'
echo "test it: $APPTAINER test --nv $OUTPUT"
