"""Wall time of the whole pipeline: `dvc repro` in a fresh clone of this repository's HEAD (no outputs, no DVC
cache), each stage timed as the gap between DVC's "Running stage" lines as they stream, then a second `dvc repro`
that must do nothing. Printed beside the targets of the pipeline issue (2 CPU cores): the embedded default in at
most 15 min, the smoke profile in at most 2 min, the no-op repro in at most 2 s; ratio = measured / target.

    python bench/bench_pipeline.py [--profile embedded|smoke] [--workdir DIR]

Run it on an otherwise idle machine: every stage is a new process whose torch + transformers imports alone take
several seconds on a small VM, so concurrent load inflates the total far more than any stage's compute.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S = {"embedded": 15 * 60, "smoke": 2 * 60}
NO_OP_TARGET_S = 2.0


def timed_repro(ws: Path, env: dict) -> tuple[float, list[tuple[str, float]]]:
    """Total seconds of one `dvc repro` and (stage, seconds) for every stage it ran, in order."""
    started = time.monotonic()
    marks: list[tuple[str, float]] = []
    lines: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.monotonic()))
    finished = time.monotonic()
    if proc.returncode != 0:
        sys.exit("dvc repro failed:\n" + "".join(lines))
    ends = [t for _, t in marks[1:]] + [finished]
    return finished - started, [(name, end - t) for (name, t), end in zip(marks, ends)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(TARGET_S), default="embedded")
    parser.add_argument("--workdir", help="where to clone (default: a new temporary directory)")
    args = parser.parse_args()

    ws = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pipeline-")) / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(ws)], check=True)
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    if args.profile != "embedded":
        subprocess.run([sys.executable, "-m", "pipeline", "profile", args.profile], cwd=ws, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ws, capture_output=True, text=True).stdout
    total, stages = timed_repro(ws, env)
    no_op, rerun = timed_repro(ws, env)
    if rerun:
        sys.exit(f"the second dvc repro ran stages: {[name for name, _ in rerun]}")

    print(f"profile {args.profile}, commit {commit.strip()}, {os.cpu_count()} CPU cores, clone at {ws}")
    print(f"{'stage':<34}{'seconds':>9}")
    for name, seconds in stages:
        print(f"{name:<34}{seconds:>9.1f}")
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    for name, seconds in stages:
        by_kind[name.split("@")[0].removesuffix("-ref")].append(seconds)
    print(f"\n{'kind':<20}{'stages':>7}{'each (mean)':>13}{'total':>9}")
    for kind, times in by_kind.items():
        print(f"{kind:<20}{len(times):>7}{sum(times) / len(times):>13.1f}{sum(times):>9.1f}")
    target = TARGET_S[args.profile]
    print(f"\nfirst dvc repro: {total:.1f} s for {len(stages)} stages (target {target} s, ratio {total / target:.2f})")
    print(f"no-op dvc repro: {no_op:.2f} s (target {NO_OP_TARGET_S:.0f} s, ratio {no_op / NO_OP_TARGET_S:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
