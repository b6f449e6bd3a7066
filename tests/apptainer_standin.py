#!/usr/bin/env python3
"""Test stand-in for `apptainer exec` (Apptainer cannot be installed here), installed first on PATH as
`apptainer`. It keeps what the pipeline depends on:
- the command runs as this process's direct child, in --pwd;
- a signal this process receives is forwarded to that direct child only (Apptainer's behaviour: with dvc
  in between, python never sees it);
- --cleanenv: the child gets only the image's environment plus the APPTAINERENV_* variables (prefix
  removed); without it, the caller's environment too. Precedence is Apptainer's ("Environment Variable
  Precedence", https://apptainer.org/docs/user/main/environment_and_metadata.html): the image's
  %environment overrides the host's variables, APPTAINERENV_* override both.
The "image" is a text file of KEY=VALUE lines: the environment its %environment would set (PATH included).
Binds are not emulated (the paths exist on the host). $APPTAINER_CALLS (a file) records each call's
arguments; $APPTAINER_ENV_DUMP (a directory) receives each call's child environment as JSON, in
<SLURM_JOB_ID>.json (the job that called; `call.json` outside SLURM)."""
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
    env = {**({} if options.get("--cleanenv") else os.environ), **image_env, **forwarded}
    if os.environ.get("APPTAINER_ENV_DUMP"):
        dump = Path(os.environ["APPTAINER_ENV_DUMP"]) / f"{os.environ.get('SLURM_JOB_ID', 'call')}.json"
        dump.write_text(json.dumps(env, indent=1, sort_keys=True))

    child = subprocess.Popen(command, cwd=options.get("--pwd"), env=env)
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _frame: child.send_signal(s))
    status = child.wait()
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
