"""Stage `transfer`: the trigger learned on each arm and the flips found on each arm (per example), applied
to every arm of one seed: source x target matrices (the diagonal re-applies an arm's own attack); and the
worst case per example over every attack a model faced: its own gradient, greedy and random attacks and every
other arm's transferred gradient attack ("worst_case", beside each method's mean). The frontier's checkpoints
are targets too (never sources), so the worst case is defined alike on the arms and along every curve they are
compared with at matched clean NLL."""
from __future__ import annotations

import time

import torch

from ..attacks import Scorer, apply_flips, summarize, trigger_offset, with_trigger
from ..arms import ARM_NAMES, frontier_checkpoints
from ..io import read_json, write_json
from ..paths import attack_dir, transfer_dir
from ..provenance import provenance, record_run
from ..params import ATTACKS, CONTROLS
from ..assessment import load_setup

METRICS = ("abs_increase", "rel_increase", "success_rate_abs", "success_rate_rel")


def _load_source(arm: str, seed: int, name: str, eval_ids: list[str]) -> dict:
    path = attack_dir(arm, seed) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"transfer needs {path}: run `python -m pipeline {name} --arm {arm} --seed {seed}`")
    result = read_json(path)   # current with its params by DVC's deps; a variation of train.* leaves it valid
    for res in ([result[m][k] for m in CONTROLS for k in ATTACKS] if name == "controls" else [result]):
        if [e["id"] for e in res["examples"]] != eval_ids:
            raise ValueError(f"{path}: its examples differ from the current attack-evaluation examples")
    return result


def _own_results(label: str, seed: int, eval_ids: list[str]) -> dict:
    """A model's own untargeted attack results: the gradient attacks and their controls."""
    return {name: _load_source(label, seed, name, eval_ids) for name in (*ATTACKS, "controls")}


def worst_case(params, setup, attacked: dict[str, torch.Tensor]) -> dict:
    """Per example, the highest attacked NLL over the named attacks [N] each; its summary, the method
    that reached it per example, and every method's mean NLL increase beside it."""
    a = params.attack
    names = list(attacked)
    stacked = torch.stack([attacked[n] for n in names])
    worst, which = stacked.max(dim=0)
    result = summarize(setup.eval.ids, setup.clean_nll, worst, a.success_threshold_nats, a.success_threshold_relative,
                       {"forward_passes": 0, "backward_passes": 0}, [{"worst_method": names[int(w)]} for w in which])
    result["methods"] = {n: (attacked[n] - setup.clean_nll).mean().item() for n in names}
    return result


def _attacked(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r["attacked_nll"] for r in rows], dtype=torch.float64)


def transfer_matrix(params, seed: int, arms: tuple[str, ...] = ARM_NAMES, checkpoints: tuple[str, ...] = ()):
    """(the matrices over `arms`, and the worst case of every arm and checkpoint; the last target's setup: its
    model and resolved precision, which every target shares)."""
    a = params.attack
    at = trigger_offset(a.uat.placement, a.prompt_tokens)
    out = {"arms": list(arms), "uat": {m: {} for m in METRICS}, "hotflip": {m: {} for m in METRICS},
           "clean_nll": {}, "own_result_deviation": {"uat": {}, "hotflip": {}}, "worst_case": {"uat": {}, "hotflip": {}}}
    sources = None
    for target in (*arms, *checkpoints):
        setup = load_setup(params, target, seed)
        if sources is None:
            sources = {arm: _own_results(arm, seed, setup.eval.ids) for arm in arms}
        scorer = Scorer(setup.model, a.continuation_tokens, a.batch_size, setup.candidates, setup.precision)
        out["clean_nll"][target] = setup.clean_nll.mean().item()
        own = sources[target] if target in arms else _own_results(target, seed, setup.eval.ids)
        faced = {kind: {"gradient": _attacked(own[kind]["examples"]),
                        **{m: _attacked(own["controls"][m][kind]["examples"]) for m in CONTROLS}} for kind in ATTACKS}
        for source in arms:
            uat = sources[source]["uat"]
            flips = [e["flips"] for e in sources[source]["hotflip"]["examples"]]
            attacked = {
                "uat": scorer.nll(with_trigger(torch.tensor(uat["trigger_ids"]), setup.eval.tokens, at), count=False),
                "hotflip": scorer.nll(apply_flips(setup.eval.tokens, flips), count=False),
            }
            for name, nll in attacked.items():
                if target not in arms:
                    faced[name][f"transfer_from_{source}"] = nll
                    continue
                summary = summarize(setup.eval.ids, setup.clean_nll, nll, a.success_threshold_nats,
                                    a.success_threshold_relative, {"forward_passes": 0, "backward_passes": 0})["summary"]
                for metric in METRICS:
                    out[name][metric].setdefault(source, {})[target] = summary[metric]
                if source == target:
                    own_abs = sources[source][name]["summary"]["abs_increase"]
                    out["own_result_deviation"][name][target] = abs(summary["abs_increase"] - own_abs)
                else:
                    faced[name][f"transfer_from_{source}"] = nll
        for kind in ATTACKS:
            out["worst_case"][kind][target] = worst_case(params, setup, faced[kind])
    return out, setup


def run(params, args) -> int:
    t0 = time.time()
    result, setup = transfer_matrix(params, args.seed, checkpoints=tuple(frontier_checkpoints(params.frontier)))
    prov = provenance(params, "transfer", seed=args.seed, precision=setup.precision)
    write_json(transfer_dir(args.seed) / "transfer.json", {**result, "provenance": prov})
    record_run(f"transfer-s{args.seed}", prov, setup.model, seconds=round(time.time() - t0, 1))
    for name in ATTACKS:
        rows = "; ".join(f"{src}->" + ",".join(f"{v:+.2f}" for v in row.values())
                         for src, row in result[name]["abs_increase"].items())
        print(f"transfer s{args.seed} {name} abs increase (source -> targets {', '.join(result['arms'])}): {rows}")
        worst = ", ".join(f"{arm} +{w['summary']['abs_increase']:.2f}" for arm, w in result["worst_case"][name].items())
        print(f"worst case s{args.seed} {name} (over gradient, greedy, random, transferred): {worst}")
    return 0
