"""Stage `transfer`: the trigger learned on each arm and the flips found on each arm (per example), applied
to every arm of one seed: source x target matrices (the diagonal re-applies an arm's own attack)."""
from __future__ import annotations

import time

import torch

from ..attacks import Scorer, apply_flips, load_setup, summarize, with_trigger
from ..arms import ARM_NAMES
from ..io import read_json, write_json
from ..paths import attack_dir, transfer_dir
from ..provenance import provenance, record_run

METRICS = ("abs_increase", "rel_increase", "success_rate_abs", "success_rate_rel")


def _load_source(params, arm: str, seed: int, name: str, eval_ids: list[str]) -> dict:
    path = attack_dir(arm, seed) / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"transfer needs {path}: run `python -m pipeline {name} --arm {arm} --seed {seed}`")
    result = read_json(path)
    if result["provenance"]["params_hash"] != params.hash():
        raise ValueError(f"{path} was made with params {result['provenance']['params_hash']}, "
                         f"current params are {params.hash()}: rerun it")
    if [e["id"] for e in result["examples"]] != eval_ids:
        raise ValueError(f"{path}: its examples differ from the current attack-evaluation examples")
    return result


def transfer_matrix(params, seed: int, arms: tuple[str, ...] = ARM_NAMES) -> dict:
    a = params.attack
    out = {"arms": list(arms), "uat": {m: {} for m in METRICS}, "hotflip": {m: {} for m in METRICS},
           "clean_nll": {}, "own_result_deviation": {"uat": {}, "hotflip": {}}}
    sources = None
    for target in arms:
        setup = load_setup(params, target, seed)
        if sources is None:
            sources = {arm: {name: _load_source(params, arm, seed, name, setup.eval.ids)
                             for name in ("uat", "hotflip")} for arm in arms}
        scorer = Scorer(setup.model, a.continuation_tokens, a.batch_size, setup.candidates, setup.precision)
        out["clean_nll"][target] = setup.clean_nll.mean().item()
        for source in arms:
            uat = sources[source]["uat"]
            flips = [e["flips"] for e in sources[source]["hotflip"]["examples"]]
            attacked = {
                "uat": scorer.nll(with_trigger(torch.tensor(uat["trigger_ids"]), setup.eval.tokens), count=False),
                "hotflip": scorer.nll(apply_flips(setup.eval.tokens, flips), count=False),
            }
            for name, nll in attacked.items():
                summary = summarize(setup.eval.ids, setup.clean_nll, nll, a.success_threshold_nats,
                                    a.success_threshold_relative, {"forward_passes": 0, "backward_passes": 0})["summary"]
                for metric in METRICS:
                    out[name][metric].setdefault(source, {})[target] = summary[metric]
                if source == target:
                    own = sources[source][name]["summary"]["abs_increase"]
                    out["own_result_deviation"][name][target] = abs(summary["abs_increase"] - own)
    return out


def run(params, args) -> int:
    t0 = time.time()
    prov = provenance(params, "transfer", seed=args.seed)
    result = transfer_matrix(params, args.seed)
    write_json(transfer_dir(args.seed) / "transfer.json", {**result, "provenance": prov})
    record_run(f"transfer-s{args.seed}", prov, seconds=round(time.time() - t0, 1))
    for name in ("uat", "hotflip"):
        rows = "; ".join(f"{src}->" + ",".join(f"{v:+.2f}" for v in row.values())
                         for src, row in result[name]["abs_increase"].items())
        print(f"transfer s{args.seed} {name} abs increase (source -> targets {', '.join(result['arms'])}): {rows}")
    return 0
