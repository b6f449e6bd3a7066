"""Data-stage throughput on a Pile-layout shard: reading and tokenizing documents, by tokenizing processes.

  python bench/bench_data.py [--documents 100000] [--vocab 8192] [--rounds 2]

Writes one `train/00.jsonl.zst` shard of `documents` documents in the Pile-uncopyrighted layout (the embedded
corpus's documents repeated, each made distinct by its index, so none is dropped as a duplicate), then times
the data stage's own functions on it: `file_documents` (zstd stream, JSON, cleaning, de-duplication) and
`tokenize_split` with 1 process and with every CPU this process may use (`available_cpus`, what the stage
uses), alternating in rounds so machine load hits both alike. Prints documents/s, MB/s and the speed-up.
The tokenizer is a byte-level BPE trained here (the cluster uses Pythia's 50k-vocabulary tokenizer, which
tokenizes at a similar rate per byte; nothing downloads)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import data as D, params as P  # noqa: E402


def write_shard(path: Path, count: int) -> int:
    """A jsonl.zst shard of `count` documents; returns its uncompressed size in bytes."""
    import zstandard

    corpus = D.embedded_documents(min_chars=200)
    lines = "".join(json.dumps({"text": f"{corpus[i % len(corpus)].text}\n\n({i})",
                                "meta": {"pile_set_name": "bench"}}) + "\n" for i in range(count)).encode()
    path.parent.mkdir(parents=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(lines))
    return len(lines)


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--documents", type=int, default=100_000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    data_params = dataclasses.replace(P.load(REPO / "profiles" / "rehearsal.yaml").data, min_chars=0)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train" / "00.jsonl.zst"
        size = write_shard(shard, args.documents)
        docs, read_s = timed(lambda: list(D.file_documents(data_params, "train/00.jsonl.zst", shard, set())))
    assert len(docs) == args.documents, f"{len(docs)} of {args.documents} documents read"
    tokenizer = D.train_bpe_tokenizer([d.text for d in docs[:2000]], args.vocab)
    dtype = D.token_dtype(len(tokenizer))
    chars = sum(len(d.text) for d in docs)

    cpus = D.available_cpus()
    seconds = {1: [], cpus: []}
    outputs = {}
    for _ in range(args.rounds):
        for processes in seconds:
            (flat, offsets), s = timed(lambda: D.tokenize_split(tokenizer, docs, dtype, processes))
            seconds[processes].append(s)
            outputs[processes] = (flat.tobytes(), offsets.tobytes())
    assert outputs[1] == outputs[cpus], "tokens depend on the number of processes"

    print(f"{args.documents} documents, {chars / 1e6:.1f} M characters ({size / 1e6:.1f} MB of JSON lines, "
          f"{chars / args.documents:.0f} characters/document), vocab {len(tokenizer)}, {len(flat)} tokens")
    print(f"read (zstd + JSON + clean + dedup): {args.documents / read_s:,.0f} documents/s "
          f"({size / 1e6 / read_s:.1f} MB/s), {read_s:.1f} s")
    median = {n: statistics.median(s) for n, s in seconds.items()}
    for n, s in median.items():
        print(f"tokenize, {n} process{'es' if n > 1 else ''}: {args.documents / s:,.0f} documents/s "
              f"({chars / 1e6 / s:.1f} M characters/s), median {s:.1f} s of {args.rounds}")
    print(f"speed-up with {cpus} processes: {median[1] / median[cpus]:.2f}x; identical tokens: yes")


if __name__ == "__main__":
    main()
