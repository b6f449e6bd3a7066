"""Atomic, durable file writes shared by every stage and the trainer's checkpoints: a file or a directory
appears whole at its final path or not at all (temp name, fsync, rename), so a crash never leaves a partial
output where DVC or a later stage looks."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)     # a write that failed part way leaves nothing behind
        raise
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(path: str | Path, obj) -> None:
    """torch.save, atomic and durable like every other write here."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def write_json(path: str | Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def read_json(path: str | Path):
    with open(path) as fh:
        return json.load(fh)


def write_csv(path: str | Path, columns: list[str], rows: list[dict]) -> None:
    """Rows as CSV with exactly `columns` (keys outside them are an error, missing ones are blank)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@contextlib.contextmanager
def staged_dir(final: str | Path):
    """Build a directory beside its final place and move it there only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
