"""Attack benchmarks (run from the repository root of a workspace holding the data and the arms' models;
embedded workspace by default). Rates are medians over rounds that alternate the runs.

  throughput  candidates scored per second by the gradient attacks (everything included: gradient passes,
              top-k, candidate construction, re-scoring) and by the bare scorer, against raw batched forward
              throughput of the same model on sequences of the same length. Goal: >= 0.7x raw.
  oracle      attack strength against exhaustive search: gradient HotFlip with one flip vs the best single
              flip over every prompt position x every candidate (first --windows evaluation windows), and
              one-token UAT vs the best one-token trigger over every candidate (optimisation examples),
              for each trigger placement and at budget multiples (--scales: topk and candidates scaled).
  strength    the oracle ratios per --arm at the default budget (issue 20, item 2), on the last --windows
              evaluation windows (no test reads the embedded data): single-flip HotFlip vs the exhaustive single
              flip, HotFlip at the edit budget vs greedy exhaustive ascent (the best single flip, applied
              edit-budget times; --ascent-windows of them), one-token UAT vs the best one-token trigger; every
              search with search seeds --search-seeds (mean and worst)
  curves      every method of both attacks on each --arm: seconds, forwards used / cap, final NLL increase,
              and the budget curves at 1/8, 1/4, 1/2 and 1 of the cap (gradient vs greedy vs random)
  scoring     UAT candidates per second with the examples' prompt cached (Scorer.trigger_nll) and with whole
              sequences (Scorer.nll), on --arm and on a Pythia-1.4B-sized layer stack (random weights, --layers)
  allocator   HotFlip and UAT candidates per second in fresh processes with glibc's default allocator and with
              pipeline.device.tune_host_allocator, alternating (each child runs `attack-rate`)
  token-nll   per-token NLL of a scoring batch (no workspace needed): pipeline.evaluation.token_nll (rows of the
              vocabulary contiguous) against cross_entropy over the transposed [N, V, S] view it replaced

    python bench/bench_attacks.py throughput [--arm pretrained] [--rounds 3]
    python bench/bench_attacks.py oracle [--arm baseline --seed 0] [--windows 6] [--scales 1 4]
    python bench/bench_attacks.py strength [--arm baseline monotonic flipped] [--windows 6] [--ascent-windows 2]
    python bench/bench_attacks.py curves [--arm baseline pretrained] [--seed 0]
    python bench/bench_attacks.py scoring [--arm pretrained] [--rounds 3] [--layers 2]
    python bench/bench_attacks.py allocator [--arm pretrained] [--rounds 3]
    python bench/bench_attacks.py token-nll [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline import attacks as A  # noqa: E402
from pipeline import params as params_mod  # noqa: E402
from pipeline.evaluation import token_nll  # noqa: E402
from pipeline.provenance import device_description  # noqa: E402
from pipeline import assessment as S  # noqa: E402


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
    return result["summary"]["budget"]["forward_passes"] / (time.perf_counter() - t0), result["summary"]


def scorer_rate(setup, a, sequences: int) -> float:
    scorer = A.Scorer(setup.model, a.continuation_tokens, a.batch_size, setup.candidates)
    tokens = setup.eval.tokens.repeat((sequences + len(setup.eval.ids) - 1) // len(setup.eval.ids), 1)[:sequences]
    t0 = time.perf_counter()
    scorer.nll(tokens)
    return sequences / (time.perf_counter() - t0)


def throughput(params, setup, args) -> None:
    a = params.attack
    uat_tokens = A.with_trigger(setup.candidates[: a.uat.trigger_length], setup.opt.tokens)
    rates = {k: [] for k in ("raw hotflip-length", "scorer", "hotflip", "raw uat-length", "uat")}
    for _ in range(args.rounds):
        rates["raw hotflip-length"].append(raw_forward_rate(setup.model, setup.eval.tokens, a.batch_size, 1024))
        rates["scorer"].append(scorer_rate(setup, a, 1024))
        rate, hotflip = attack_rate(S.run_hotflip, setup, a)
        rates["hotflip"].append(rate)
        rates["raw uat-length"].append(raw_forward_rate(setup.model, uat_tokens, a.uat.batch_size, 1024))
        rate, uat = attack_rate(S.run_uat, setup, a)
        rates["uat"].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"hotflip: {hotflip['budget']['forward_passes']} candidates, {hotflip['budget']['backward_passes']} "
          f"backward; uat: {uat['budget']['forward_passes']} candidates, {uat['budget']['backward_passes']} backward")
    print(f"{'run':<22}{'seq or cand /s':>16}{'vs raw':>10}")
    for name, raw in (("scorer", "raw hotflip-length"), ("hotflip", "raw hotflip-length"), ("uat", "raw uat-length")):
        print(f"{raw:<22}{med[raw]:>16.1f}{1.0:>10.2f}\n{name:<22}{med[name]:>16.1f}{med[name] / med[raw]:>10.2f}")


def scaled(a, scale: int, **changes):
    u, h = a.uat, a.hotflip
    return dataclasses.replace(
        a, uat=dataclasses.replace(u, topk=u.topk * scale, candidates_per_step=u.candidates_per_step * scale,
                                   **changes.get("uat", {})),
        hotflip=dataclasses.replace(h, topk=h.topk * scale, candidates_per_flip=h.candidates_per_flip * scale,
                                    **changes.get("hotflip", {})))


def oracle(params, setup, args) -> None:
    a = params.attack
    setup.eval = A.Examples(setup.eval.ids[:args.windows], setup.eval.tokens[:args.windows], a.prompt_tokens,
                            a.continuation_tokens)
    setup.clean_nll = setup.clean_nll[:args.windows]
    scorer = A.Scorer(setup.model, a.continuation_tokens, 256, setup.candidates, setup.precision)
    t0 = time.perf_counter()
    best = A.oracle_single_flip(scorer, setup.eval.tokens, prompt_tokens=a.prompt_tokens, candidates=setup.candidates)
    best_inc = (best["nll"] - setup.clean_nll).mean().item()
    print(f"oracle single flip: {args.windows} windows x {a.prompt_tokens} positions x {len(setup.candidates)} "
          f"candidates = {scorer.forward_passes} forwards, {time.perf_counter() - t0:.0f} s; best mean increase "
          f"{best_inc:+.4f} nats/token")
    for scale in args.scales:
        r = S.run_hotflip(setup, scaled(a, scale, hotflip={"flips": 1}), 0, "gradient")["summary"]
        print(f"  gradient hotflip, 1 flip, budget x{scale}: {r['abs_increase']:+.4f} = {r['abs_increase'] / best_inc:.2f} "
              f"of the oracle ({r['budget']['forward_passes']}/{r['budget_limit']['forward_passes']} forwards)")
    for placement in ("prefix", "before_continuation"):
        at = A.trigger_offset(placement, a.prompt_tokens)
        scorer = A.Scorer(setup.model, a.continuation_tokens, 256, setup.candidates, setup.precision)
        clean = scorer.nll(setup.opt.tokens, count=False).mean().item()
        t0 = time.perf_counter()
        top = A.oracle_trigger(scorer, setup.opt.tokens, candidates=setup.candidates, at=at)
        inc = top["opt_nll"] - clean
        print(f"oracle one-token trigger ({placement}): {scorer.forward_passes} forwards, "
              f"{time.perf_counter() - t0:.0f} s; best increase {inc:+.4f} nats/token "
              f"(optimisation examples), trigger {setup.tokenizer.decode(top['trigger'].tolist())!r}")
        for scale in args.scales:
            r = S.run_uat(setup, scaled(a, scale, uat={"trigger_length": 1, "placement": placement}), 0, "gradient")
            print(f"  gradient uat, 1 token, budget x{scale}: {r['opt_nll'] - clean:+.4f} = "
                  f"{(r['opt_nll'] - clean) / inc:.2f} of the oracle ({r['summary']['budget']['forward_passes']}/"
                  f"{r['summary']['budget_limit']['forward_passes']} forwards)")


def last_windows(setup, a, count: int) -> None:
    """Keep the last `count` evaluation windows (with their clean NLL) in setup."""
    setup.eval = A.Examples(setup.eval.ids[-count:], setup.eval.tokens[-count:], a.prompt_tokens, a.continuation_tokens)
    setup.clean_nll = setup.clean_nll[-count:]


def greedy_ascent(scorer, tokens, a, candidates, steps: int) -> torch.Tensor:
    """Per example, the NLL after `steps` rounds of the best exhaustive single flip (each round on the last's)."""
    current = tokens.clone()
    for _ in range(steps):
        best = A.oracle_single_flip(scorer, current, prompt_tokens=a.prompt_tokens, candidates=candidates)
        current = A.apply_flips(current, best["flips"])
    return best["nll"]


def ratios(values: list[float], reference: float) -> str:
    r = [v / reference for v in values]
    return f"{statistics.mean(r):.2f} (worst {min(r):.2f})"


def strength(params, args) -> None:
    a = params.attack
    one_flip = dataclasses.replace(a, hotflip=dataclasses.replace(a.hotflip, flips=1))
    one_token = dataclasses.replace(a, uat=dataclasses.replace(a.uat, trigger_length=1))
    at = A.trigger_offset(a.uat.placement, a.prompt_tokens)
    print(f"| arm | single flip: oracle | HotFlip 1 flip | {a.hotflip.flips} flips: greedy ascent | HotFlip "
          f"{a.hotflip.flips} flips | one-token trigger: oracle | UAT 1 token |\n|---|---|---|---|---|---|---|")
    for arm in args.arm:
        setup = S.load_setup(params, arm, args.seed)
        last_windows(setup, a, args.windows)
        scorer = A.Scorer(setup.model, a.continuation_tokens, 256, setup.candidates, setup.precision)
        single = (A.oracle_single_flip(scorer, setup.eval.tokens, prompt_tokens=a.prompt_tokens,
                                       candidates=setup.candidates)["nll"] - setup.clean_nll).mean().item()
        k = args.ascent_windows
        ascent = (greedy_ascent(scorer, setup.eval.tokens[:k], a, setup.candidates, a.hotflip.flips)
                  - setup.clean_nll[:k]).mean().item()
        clean_opt = scorer.nll(setup.opt.tokens, count=False).mean().item()
        trigger = A.oracle_trigger(scorer, setup.opt.tokens, candidates=setup.candidates, at=at)["opt_nll"] - clean_opt
        hot1, hotk, uat1 = [], [], []
        for seed in args.search_seeds:
            hot1.append(S.run_hotflip(setup, one_flip, seed, "gradient")["summary"]["abs_increase"])
            found = S.run_hotflip(setup, a, seed, "gradient")
            hotk.append(statistics.mean(e["abs_increase"] for e in found["examples"][:k]))
            uat1.append(S.run_uat(setup, one_token, seed, "gradient")["opt_nll"] - clean_opt)
        print(f"| {arm} | {single:+.3f} | {ratios(hot1, single)} | {ascent:+.3f} | {ratios(hotk, ascent)} | "
              f"{trigger:+.3f} | {ratios(uat1, trigger)} |", flush=True)


def curves(params, args) -> None:
    for arm in args.arm:
        setup = S.load_setup(params, arm, args.seed)
        results, total = {}, 0.0
        for kind in S.RUNNERS:
            for method in ("gradient", "greedy", "random"):
                t0 = time.perf_counter()
                results[kind, method] = r = S.RUNNERS[kind](setup, params.attack, args.seed, method)
                seconds = time.perf_counter() - t0
                total += seconds
                s = r["summary"]
                print(f"{arm} s{args.seed} {kind:<8}{method:<9}{seconds:6.1f} s  {s['budget']['forward_passes']:>6}/"
                      f"{s['budget_limit']['forward_passes']:<6} forwards  +{s['abs_increase']:.4f} nats/token "
                      f"(success {s['success_rate_abs']:.0%})")
        print(f"{arm} s{args.seed}: attacks {total:.1f} s in all")
        for kind, d in S.diagnostics(results).items():
            c = d["budget_curves"]
            fmt = lambda vs: " ".join("   -   " if v is None else f"{v:+.4f}" for v in vs)  # noqa: E731
            print(f"  {kind} curve ({d['objective']}) at forwards {c['forward_passes']}: gradient {fmt(c['gradient'])} | "
                  f"greedy {fmt(c['greedy'])} | random {fmt(c['random'])}")
            g = d["gradient_vs_greedy"]
            print(f"  {kind} gradient vs greedy at {g['forward_passes']} forwards: {g['gradient']:+.4f} vs "
                  f"{g['greedy']:+.4f}; first-order rank correlation {d['first_order_rank_correlation']:+.3f}")


def trigger_scoring_rates(model, tokens, candidates, a, triggers: int, rounds: int) -> dict:
    """Candidates (trigger x example) per second, median over rounds alternating the two ways, and the largest
    difference between their NLLs."""
    at = A.trigger_offset(a.uat.placement, a.prompt_tokens)
    picked = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(0))[:triggers * a.uat.trigger_length]]
    batch = picked.view(triggers, a.uat.trigger_length)
    ways = {"whole sequences": lambda s: s.nll(A._triggered_batch(batch, tokens, at)).view(triggers, len(tokens)),
            "prompt cached": lambda s: s.trigger_nll(batch, tokens, at)}
    rates, results = {name: [] for name in ways}, {}
    for _ in range(rounds):
        for name, way in ways.items():
            scorer = A.Scorer(model, a.continuation_tokens, a.uat.batch_size, candidates)
            t0 = time.perf_counter()
            results[name] = way(scorer)
            rates[name].append(triggers * len(tokens) / (time.perf_counter() - t0))
    diff = (results["whole sequences"] - results["prompt cached"]).abs().max().item()
    return {**{name: statistics.median(r) for name, r in rates.items()}, "max |diff| (nats)": diff}


def pythia_sized_stack(layers: int, vocab: int = 50304):
    """Pythia-1.4B's layer shape (hidden 2048, 16 heads, MLP 8192, its vocabulary), `layers` deep, random."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16,
                           intermediate_size=8192, max_position_embeddings=2048, rotary_pct=0.25)
    return GPTNeoXForCausalLM(config).eval()


def scoring(params, setup, args) -> None:
    """Under the pipeline's allocator (pipeline.device.tune_host_allocator), as the stages run."""
    from pipeline.device import tune_host_allocator

    tune_host_allocator()
    a = params.attack
    print(f"UAT placement {a.uat.placement}, trigger {a.uat.trigger_length} tokens, prompt {a.prompt_tokens}, "
          f"continuation {a.continuation_tokens}, {len(setup.opt.ids)} optimisation examples")
    stack = pythia_sized_stack(args.layers)
    runs = {f"embedded arm {args.arm[0]}": (setup.model, 64),
            f"Pythia-1.4B-sized, {args.layers} layers": (stack, 4)}
    for name, (model, triggers) in runs.items():
        rates = trigger_scoring_rates(model, setup.opt.tokens, setup.candidates, a, triggers, args.rounds)
        print(f"{name}: {triggers} triggers x {len(setup.opt.ids)} examples; whole sequences "
              f"{rates['whole sequences']:.1f} cand/s, prompt cached {rates['prompt cached']:.1f} cand/s, ratio "
              f"{rates['prompt cached'] / rates['whole sequences']:.2f}x; max |diff| {rates['max |diff| (nats)']:.1e} nats")


def attack_rates(params, setup, args) -> None:
    """Child of `allocator`: tunes the allocator or not, then prints the gradient attacks' candidates/s as JSON."""
    from pipeline.device import tune_host_allocator

    tuned = args.allocator == "tuned" and tune_host_allocator()
    out = {"tuned": tuned}
    for name, run in (("hotflip", S.run_hotflip), ("uat", S.run_uat)):
        out[name], _ = attack_rate(run, setup, params.attack)
    print(json.dumps(out))


def allocator(params, args) -> None:
    rates = {mode: {"hotflip": [], "uat": []} for mode in ("default", "tuned")}
    for _ in range(args.rounds):
        for mode in rates:
            child = subprocess.run([sys.executable, __file__, "attack-rate", "--allocator", mode, "--params",
                                    args.params, "--arm", args.arm[0], "--seed", str(args.seed)],
                                   check=True, capture_output=True, text=True)
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            assert measured["tuned"] == (mode == "tuned")
            for name in ("hotflip", "uat"):
                rates[mode][name].append(measured[name])
    for name in ("hotflip", "uat"):
        default, tuned = (statistics.median(rates[mode][name]) for mode in ("default", "tuned"))
        print(f"{name}: default allocator {default:.1f} cand/s, tuned {tuned:.1f} cand/s, ratio {tuned / default:.2f}x")


def token_nll_rate(args, shape=(256, 32, 8192)) -> None:
    """Milliseconds per call, median over rounds alternating the two ways, on one random batch of logits."""
    logits = torch.randn(*shape)
    targets = torch.randint(0, shape[-1], shape[:2])
    ways = {"token_nll (contiguous rows)": lambda: token_nll(logits, targets),
            "cross_entropy over [N, V, S]": lambda: torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), targets, reduction="none")}
    assert torch.allclose(*(way() for way in ways.values()), atol=1e-5)
    times = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            times[name].append(1000 * (time.perf_counter() - t0))
    ms = {name: statistics.median(t) for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name}: {value:.1f} ms per {'x'.join(map(str, shape))} call")
    print(f"ratio: {ms['cross_entropy over [N, V, S]'] / ms['token_nll (contiguous rows)']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("throughput", "oracle", "strength", "curves", "scoring", "allocator",
                                     "attack-rate", "token-nll"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--arm", nargs="+", default=["pretrained"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--layers", type=int, default=2, help="scoring: layers of the Pythia-1.4B-sized stack")
    ap.add_argument("--ascent-windows", type=int, default=2, help="strength: windows of the greedy-ascent reference")
    ap.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1, 2], help="strength: search seeds")
    ap.add_argument("--allocator", choices=("default", "tuned"), default="default", help="attack-rate only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "token-nll":
        token_nll_rate(args)
        return 0
    params = params_mod.load(args.params)
    if args.mode != "attack-rate":
        print(f"device: {device_description()}; profile {params.profile}, arms {', '.join(args.arm)}, seed {args.seed}")
    if args.mode == "curves":
        curves(params, args)
    elif args.mode == "allocator":
        allocator(params, args)
    elif args.mode == "strength":
        strength(params, args)
    else:
        setup = S.load_setup(params, args.arm[0], args.seed)
        modes = {"throughput": throughput, "oracle": oracle, "scoring": scoring, "attack-rate": attack_rates}
        modes[args.mode](params, setup, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
