#!/usr/bin/env python3
"""Test stand-in for `apptainer exec` (Apptainer cannot be installed here), installed first on PATH as
`apptainer`. It keeps what the pipeline depends on:
- the command runs as this process's direct child, in --pwd;
- a signal this process receives is forwarded to that direct child only (Apptainer's behaviour: with dvc
  in between, python never sees it);
- --cleanenv: the child gets only the APPTAINERENV_* variables (prefix removed) plus the image's
  environment; without it, the caller's environment too.
The "image" is a text file of KEY=VALUE lines: the environment its %environment would set (PATH included).
Binds are not emulated (the paths exist on the host). $APPTAINER_CALLS (a file) records each call's
arguments; $APPTAINER_ENV_DUMP (a file) receives the child's environment as JSON."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
VALUED = {"--bind", "-B", "--pwd", "--env", "--home", "--overlay"}


def main(argv: list[str]) -> int:
    if os.environ.get("APPTAINER_CALLS"):
        with open(os.environ["APPTAINER_CALLS"], "a") as calls:
            calls.write(" ".join(argv) + "\n")
    if argv[:1] != ["exec"]:
        sys.exit(f"apptainer stand-in: only `exec` is supported, got {argv[:1]}")
    args, options = argv[1:], {}
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        options[flag] = args.pop(0) if flag in VALUED else True
    image, command = Path(args[0]), args[1:]
    image_env = dict(line.split("=", 1) for line in image.read_text().splitlines() if "=" in line)
    forwarded = {k[len("APPTAINERENV_"):]: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}
    env = {**({} if options.get("--cleanenv") else os.environ), **forwarded, **image_env}
    if os.environ.get("APPTAINER_ENV_DUMP"):
        Path(os.environ["APPTAINER_ENV_DUMP"]).write_text(json.dumps(env, indent=1, sort_keys=True))

    child = subprocess.Popen(command, cwd=options.get("--pwd"), env=env)
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _frame: child.send_signal(s))
    status = child.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
