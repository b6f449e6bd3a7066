"""Attack throughput, side by side in one process (run from the repository root after the data and pretrain
stages; embedded workspace by default): candidates scored per second by the gradient attacks (HotFlip and UAT,
everything included: gradient passes, top-k, candidate construction, re-scoring) and by the bare scorer,
against the raw batched forward throughput of the same model on sequences of the same length and batch size
(`model(input_ids).logits`, no loss). Goal: attack candidates/s >= 0.7x raw sequences/s.
Rounds alternate the runs so machine load hits all of them alike; rates are medians over rounds.

    python bench/bench_attacks.py [--params params.yaml] [--arm pretrained] [--rounds 3] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline import attacks as A  # noqa: E402
from pipeline import params as params_mod  # noqa: E402
from pipeline.provenance import device_description  # noqa: E402


def raw_forward_rate(model, tokens: torch.Tensor, batch_size: int, sequences: int) -> float:
    """Sequences per second of plain batched forwards (full logits) over `sequences` copies of the examples."""
    batch = tokens.repeat((batch_size + len(tokens) - 1) // len(tokens), 1)[:batch_size]
    done, t0 = 0, time.perf_counter()
    with torch.no_grad():
        while done < sequences:
            model(input_ids=batch).logits
            done += batch_size
    return done / (time.perf_counter() - t0)


def attack_rate(run, setup, a) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = run(setup, a, 0, "gradient")
    seconds = time.perf_counter() - t0
    return result["summary"]["budget"]["forward_passes"] / seconds, result["summary"]


def scorer_rate(setup, a, sequences: int) -> float:
    scorer = A.Scorer(setup.model, a.continuation_tokens, a.batch_size, setup.candidates)
    tokens = setup.eval.tokens.repeat((sequences + len(setup.eval.ids) - 1) // len(setup.eval.ids), 1)[:sequences]
    t0 = time.perf_counter()
    scorer.nll(tokens)
    return sequences / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--arm", default="pretrained")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = params_mod.load(args.params)
    a = params.attack
    setup = A.load_setup(params, args.arm, 0)
    uat_tokens = A.with_trigger(setup.candidates[: a.uat.trigger_length], setup.opt.tokens)
    rates = {k: [] for k in ("raw hotflip-length", "scorer", "hotflip", "raw uat-length", "uat")}
    for _ in range(args.rounds):
        rates["raw hotflip-length"].append(raw_forward_rate(setup.model, setup.eval.tokens, a.batch_size, 1024))
        rates["scorer"].append(scorer_rate(setup, a, 1024))
        rate, hotflip = attack_rate(A.run_hotflip, setup, a)
        rates["hotflip"].append(rate)
        rates["raw uat-length"].append(raw_forward_rate(setup.model, uat_tokens, a.uat.batch_size, 1024))
        rate, uat = attack_rate(A.run_uat, setup, a)
        rates["uat"].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"device: {device_description()}; profile {params.profile}, arm {args.arm}, {args.rounds} rounds (medians)")
    print(f"hotflip: {hotflip['budget']['forward_passes']} candidates, {hotflip['budget']['backward_passes']} "
          f"backward; uat: {uat['budget']['forward_passes']} candidates, {uat['budget']['backward_passes']} backward")
    print(f"{'run':<22}{'seq or cand /s':>16}{'vs raw':>10}")
    print(f"{'raw forward (P+C)':<22}{med['raw hotflip-length']:>16.1f}{1.0:>10.2f}")
    print(f"{'scorer.nll (P+C)':<22}{med['scorer']:>16.1f}{med['scorer'] / med['raw hotflip-length']:>10.2f}")
    print(f"{'hotflip candidates':<22}{med['hotflip']:>16.1f}{med['hotflip'] / med['raw hotflip-length']:>10.2f}")
    print(f"{'raw forward (L+P+C)':<22}{med['raw uat-length']:>16.1f}{1.0:>10.2f}")
    print(f"{'uat candidates':<22}{med['uat']:>16.1f}{med['uat'] / med['raw uat-length']:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
