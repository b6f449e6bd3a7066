"""What the measuring stages share (`attack`, `evaluate`, `assess`, `transfer`): an arm's attack setup, its test
perplexity, and the attack steps with their resumable cache, written where the stages' outputs go.

Attack steps, around the pure searches of pipeline/attacks.py:
  uat       gradient UAT on the attack-optimisation examples, evaluated on the attack-evaluation examples
  hotflip   gradient HotFlip on the prompt tokens of each attack-evaluation example
  controls  greedy (same searches, uniform candidates) and random (best of N) for both, at the gradient
            attack's hard forward cap; also writes diagnostics.json: gradient vs greedy at equal forward
            budget (from the budget curves), the first-order/true-loss rank correlation, and every
            method's budget curve sampled at fractions of the cap
  targeted  GCG's objective with HotFlip's search on each attack-evaluation example's prompt, toward another
            example's continuation, and its random control at the same forward cap (one file, both methods)

Resumable: every method's result is cached as it completes under
outputs/checkpoints/<arm>-s<seed>/assess/<fingerprint>/ (fingerprint: attack and eval params, the example
sets and candidate pool, the model's weights and this code), and a search or random control stopped by
SIGUSR1/SIGTERM saves its state there; a rerun skips finished methods, resumes the stopped one, and the stage
exits REQUEUE_EXIT_CODE (75) when stopped. `assess` removes the cache once every arm of its job is done; a
single step's run keeps it for the next step (e.g. controls after uat). Not a DVC output."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import paths
from . import attacks
from . import data
from .data import load_tokenizer
from .device import resolve_precision
from .evaluation import document_nll, perplexity
from .io import read_json, staged_dir, write_json
from .loading import load_arm_model
from .params import CONTROLS, STEPS, TARGETED, TARGETED_METHODS
from .paths import DATA_DIR, attack_dir, checkpoint_dir, eval_dir, run_name
from .provenance import provenance, record_run
from .stopping import REQUEUE_EXIT_CODE, StopRequests

CURVE_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
CODE = ("attacks.py", "assessment.py", "data.py", "device.py")


@dataclass
class AttackSetup:
    """Everything the attacks need for one arm: model, tokenizer, candidate ids, both example sets and
    the clean loss of the evaluation examples."""
    model: object
    meta: dict
    tokenizer: object
    candidates: torch.Tensor
    opt: attacks.Examples
    eval: attacks.Examples
    clean_nll: torch.Tensor
    precision: str                # eval.precision as resolved on the model's device ("bf16" or "fp32")
    model_dir: Path | None = None


def load_setup(params, arm: str, seed: int, data_dir: str | Path | None = None, loaded=None) -> AttackSetup:
    """`loaded`: an already loaded (model, meta) of this arm (assess loads it once)."""
    data_dir = Path(data_dir or paths.DATA_DIR)
    a = params.attack
    model, meta = loaded or load_arm_model(params, arm, seed, scoring=True)
    tokenizer = load_tokenizer(data_dir / "tokenizer")
    candidates = attacks.candidate_ids(tokenizer, model.get_input_embeddings().weight.shape[0])
    opt = attacks.attack_examples(data_dir, "attack_opt", a.opt_examples, a.prompt_tokens, a.continuation_tokens)
    evaluation = attacks.attack_examples(data_dir, "attack_eval", a.eval_examples, a.prompt_tokens, a.continuation_tokens)
    precision = resolve_precision(params.eval.precision, model.get_input_embeddings().weight.device)
    clean = attacks.Scorer(model, a.continuation_tokens, a.batch_size, candidates, precision).nll(evaluation.tokens, count=False)
    return AttackSetup(model, meta, tokenizer, candidates, opt, evaluation, clean, precision,
                       paths.model_dir(arm, seed))


def _scorer(setup: AttackSetup, a, batch_size: int | None = None) -> attacks.Scorer:
    return attacks.Scorer(setup.model, a.continuation_tokens, batch_size or a.batch_size, setup.candidates, setup.precision)


def _extras(found: dict) -> dict:
    """Budget curve and, for gradient searches, the first-order correlation diagnostic."""
    out = {"budget_curve": found["curve"]}
    if "correlations" in found:
        out["first_order_rank_correlation"] = {"mean": attacks.mean_correlation(found["correlations"]),
                                               "per_step": found["correlations"]}
    return out


def run_uat(setup: AttackSetup, a, seed: int, method: str, *, should_stop=attacks.never, store=None) -> dict:
    """method: "gradient" (UAT), "greedy" (uniform candidates, same search) or "random" (best random trigger).
    The budget curve is of the optimisation objective: mean NLL increase over the optimisation examples."""
    u = a.uat
    at = attacks.trigger_offset(u.placement, a.prompt_tokens)
    scorer = _scorer(setup, a, u.batch_size)
    tokens = setup.opt.tokens
    if method == "random":
        found = attacks.uat_random_search(scorer, tokens, candidates=setup.candidates, trigger_length=u.trigger_length,
                                    draws=attacks.uat_forward_cap(u, 1), at=at, gen=attacks.generator(seed, "random_uat"),
                                    should_stop=should_stop, store=store)
    else:
        guided = method == "gradient"
        found = attacks.uat_search(scorer, tokens, candidates=setup.candidates, uat=u, at=at, guided=guided,
                             gen=attacks.generator(seed, "uat" if guided else "greedy_uat"), should_stop=should_stop, store=store)
    used = {"forward_passes": scorer.forward_passes, "backward_passes": scorer.backward_passes}
    clean_opt = scorer.nll(tokens, count=False).mean().item()
    found["curve"] = [[f, v - clean_opt] for f, v in found["curve"]]
    trigger = found["trigger"]
    attacked = scorer.nll(attacks.with_trigger(trigger, setup.eval.tokens, at), count=False)
    limit = {"forward_passes": attacks.uat_forward_cap(u, len(tokens)),
             "backward_passes": u.restarts * u.iterations * len(tokens) if method == "gradient" else 0}
    result = attacks.summarize(setup.eval.ids, setup.clean_nll, attacked, a.success_threshold_nats,
                         a.success_threshold_relative, used, budget_limit=limit)
    result.update({"trigger_ids": trigger.tolist(), "trigger_text": setup.tokenizer.decode(trigger.tolist()),
                   "placement": u.placement, "opt_nll": found["opt_nll"], "opt_clean_nll": clean_opt,
                   "opt_examples": len(setup.opt.ids), "evaluation_forward_passes": 2 * len(setup.eval.ids),
                   **_extras(found)})
    if "restarts" in found:
        result["restarts"] = found["restarts"]
    return result


def run_hotflip(setup: AttackSetup, a, seed: int, method: str, *, should_stop=attacks.never, store=None) -> dict:
    """method: "gradient" (HotFlip), "greedy" (uniform candidates, same search) or "random" (best of N
    random perturbations with `flips` flips). The budget curve is of the mean NLL increase itself."""
    h = a.hotflip
    scorer = _scorer(setup, a)
    tokens = setup.eval.tokens
    common = {"prompt_tokens": a.prompt_tokens, "candidates": setup.candidates}
    if method == "random":
        found = attacks.hotflip_random_search(scorer, tokens, setup.clean_nll, flips=h.flips,
                                        draws=attacks.hotflip_forward_cap(h, 1), gen=attacks.generator(seed, "random_hotflip"),
                                        should_stop=should_stop, store=store, **common)
    else:
        guided = method == "gradient"
        found = attacks.hotflip_search(scorer, tokens, setup.clean_nll, hotflip=h, guided=guided,
                                 gen=attacks.generator(seed, "hotflip" if guided else "greedy_hotflip"),
                                 should_stop=should_stop, store=store, **common)
    used = {"forward_passes": scorer.forward_passes, "backward_passes": scorer.backward_passes}
    # the reported attacked loss is re-measured on the final tokens, in the same batches as the clean loss
    attacked = scorer.nll(found["tokens"], count=False)
    limit = {"forward_passes": attacks.hotflip_forward_cap(h, len(tokens)),
             "backward_passes": h.steps * len(tokens) if method == "gradient" else 0}
    result = attacks.summarize(setup.eval.ids, setup.clean_nll, attacked, a.success_threshold_nats,
                         a.success_threshold_relative, used, [{"flips": f} for f in found["flips"]], limit)
    result.update({"evaluation_forward_passes": 2 * len(setup.eval.ids), **_extras(found)})
    return result


def run_targeted(setup: AttackSetup, a, seed: int, method: str, *, should_stop=attacks.never, store=None) -> dict:
    """method: "gradient" (HotFlip's search toward each example's target) or "random" (best of N random
    perturbations with `flips` flips, N the search's forward cap). Per example: the target's NLL before and after,
    its decrease (the objective gained) and whether greedy decoding then emits the target's first match_tokens
    tokens. The budget curve is of the mean decrease."""
    t, h = a.targeted, a.hotflip
    examples, sources = attacks.targeted_examples(setup.eval, t.target_tokens)
    scorer = attacks.Scorer(setup.model, t.target_tokens, a.batch_size, setup.candidates, setup.precision, targeted=True)
    tokens = examples.tokens
    clean = scorer.nll(tokens, count=False)                         # minus the target's NLL
    common = {"prompt_tokens": a.prompt_tokens, "candidates": setup.candidates, "should_stop": should_stop,
              "store": store}
    if method == "random":
        found = attacks.hotflip_random_search(scorer, tokens, clean, flips=h.flips, draws=attacks.hotflip_forward_cap(h, 1),
                                              gen=attacks.generator(seed, "random_targeted"), **common)
    else:
        found = attacks.hotflip_search(scorer, tokens, clean, hotflip=h, guided=True,
                                       gen=attacks.generator(seed, "targeted"), **common)
    attacked = scorer.nll(found["tokens"], count=False)
    matched = scorer.greedy_match(found["tokens"], t.match_tokens)
    matched_clean = scorer.greedy_match(tokens, t.match_tokens)
    rows = [{"id": ex, "target_from": src, "clean_target_nll": -clean[i].item(),
             "attacked_target_nll": -attacked[i].item(), "nll_decrease": (attacked[i] - clean[i]).item(),
             "exact_match": bool(matched[i]), "clean_exact_match": bool(matched_clean[i]), "flips": found["flips"][i]}
            for i, (ex, src) in enumerate(zip(examples.ids, sources))]
    used = {"forward_passes": scorer.forward_passes, "backward_passes": scorer.backward_passes}
    limit = {"forward_passes": attacks.hotflip_forward_cap(h, len(tokens)),
             "backward_passes": h.steps * len(tokens) if method == "gradient" else 0}
    summary = {"clean_target_nll": -clean.mean().item(), "attacked_target_nll": -attacked.mean().item(),
               "nll_decrease": (attacked - clean).mean().item(), "exact_match": matched.double().mean().item(),
               "clean_exact_match": matched_clean.double().mean().item(), "examples": len(rows),
               "target_tokens": t.target_tokens, "match_tokens": t.match_tokens, "budget": used, "budget_limit": limit}
    return {"summary": summary, "examples": rows, "evaluation_forward_passes": 4 * len(rows), **_extras(found)}


RUNNERS = {"uat": run_uat, "hotflip": run_hotflip}     # the untargeted attacks, each with greedy and random controls


def diagnostics(results: dict) -> dict:
    """Per attack: gradient vs greedy at the equal forward budget both reached (the gradient-masking
    check: a constrained model whose gradients are less informative shows gradient <= greedy), the
    first-order/true-loss rank correlation, and each method's budget curve at fractions of the cap.
    results[(kind, method)] -> result."""
    out = {}
    for kind in RUNNERS:
        grad, greedy = results[kind, "gradient"], results[kind, "greedy"]
        equal = min(grad["summary"]["budget"]["forward_passes"], greedy["summary"]["budget"]["forward_passes"])
        g, r = attacks.curve_at(grad["budget_curve"], equal), attacks.curve_at(greedy["budget_curve"], equal)
        cap = grad["summary"]["budget_limit"]["forward_passes"]
        out[kind] = {
            "objective": "optimisation examples" if kind == "uat" else "evaluation examples",
            "gradient_vs_greedy": {"forward_passes": equal, "gradient": g, "greedy": r,
                                   "difference": None if g is None or r is None else g - r},
            "first_order_rank_correlation": grad["first_order_rank_correlation"]["mean"],
            "budget_curves": {"forward_passes": [round(f * cap) for f in CURVE_FRACTIONS],
                              **{m: [attacks.curve_at(results[kind, m]["budget_curve"], round(f * cap))
                                     for f in CURVE_FRACTIONS] for m in ("gradient", "greedy", "random")}},
        }
    return out


# --- test perplexity -------------------------------------------------------------------------------------

def evaluate(params, arm: str, seed: int, model, meta: dict) -> dict:
    """Perplexity of an already loaded arm model; writes eval/<arm>-s<seed>/ and returns its metrics."""
    t0 = time.time()
    e = params.eval
    test = data.TokenSplit(DATA_DIR, "test")
    doc_ids = [d.id for d in data.read_docs(DATA_DIR / "docs" / "test.jsonl")]
    if len(doc_ids) != len(test):
        raise ValueError(f"{DATA_DIR}: docs/test.jsonl lists {len(doc_ids)} documents, tokens hold {len(test)}")
    count = len(test) if e.max_documents == 0 else min(e.max_documents, len(test))
    docs = [test.document(i) for i in range(count)]
    nll, tokens = document_nll(model, docs, test.eos_id, e.context_length, e.stride, e.batch_size,
                               desc=f"evaluate {arm}", precision=e.precision)
    device = next(model.parameters()).device
    prov = provenance(params, "evaluate", seed=seed, arm=arm, precision=resolve_precision(e.precision, device))
    metrics = {"arm": arm, "seed": seed, "perplexity": perplexity(nll, tokens),
               "nll_per_token": float(nll.sum() / tokens.sum()), "tokens": int(tokens.sum()),
               "documents": count, "context_length": e.context_length, "stride": e.stride,
               "model_meta": meta, "provenance": prov}
    per_doc = {"doc_ids": doc_ids[:count], "nll": nll.tolist(), "tokens": tokens.astype(np.int64).tolist(),
               "provenance": prov}
    with staged_dir(eval_dir(arm, seed)) as out:
        write_json(out / "metrics.json", metrics)
        write_json(out / "per_doc.json", per_doc)
    seconds = round(time.time() - t0, 1)
    record_run(f"evaluate-{run_name(arm, seed)}", prov, model, seconds=seconds)
    print(f"evaluate {arm} s{seed}: test perplexity {metrics['perplexity']:.2f} "
          f"({metrics['tokens']} tokens, {count} documents), {seconds} s")
    return metrics


# --- resumable per-method cache -------------------------------------------------------------------------

def hash_files(h, paths) -> None:
    """Feed the bytes of every file in `paths`, in order, to the hash object h."""
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)


def fingerprint(params, setup: AttackSetup, arm: str, seed: int) -> str:
    """Everything that determines the attack results: attack and eval params, the data (both example sets
    and the candidate pool), the model's weights, the code."""
    h = hashlib.sha256(json.dumps({"attack": dataclasses.asdict(params.attack), "eval": params.eval.precision,
                                   "precision": setup.precision, "arm": arm, "seed": seed,
                                   "examples": [setup.opt.ids, setup.eval.ids]}, sort_keys=True).encode())
    for tensor in (setup.opt.tokens, setup.eval.tokens, setup.candidates):
        h.update(tensor.numpy().tobytes())
    hash_files(h, sorted(Path(setup.model_dir).glob("*.safetensors")) if setup.model_dir else ())
    root = Path(attacks.__file__).parent
    hash_files(h, [root / name for name in CODE])
    return h.hexdigest()[:16]


class MethodCache:
    """Finished methods' results (JSON) and stopped searches' states, under one fingerprint directory."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def result(self, name: str) -> dict | None:
        path = self.root / f"{name}.json"
        return read_json(path) if path.exists() else None

    def put(self, name: str, result: dict) -> None:
        write_json(self.root / f"{name}.json", result)
        self.store(name).clear()

    def store(self, name: str) -> attacks.StateStore:
        return attacks.StateStore(self.root / f"{name}.state.pt")

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def cache_for(params, setup: AttackSetup, arm: str, seed: int) -> MethodCache:
    return MethodCache(checkpoint_dir(arm, seed) / "assess" / fingerprint(params, setup, arm, seed))


def method_result(params, setup: AttackSetup, seed: int, kind: str, method: str, cache: MethodCache,
                  should_stop=attacks.never) -> dict:
    """A method's result from the cache, else computed (resuming a stopped search) and cached."""
    name = f"{kind}-{method}"
    result = cache.result(name)
    if result is None:
        if should_stop():
            raise attacks.SearchStopped
        runner = run_targeted if kind == TARGETED else RUNNERS[kind]
        result = runner(setup, params.attack, seed, method, should_stop=should_stop, store=cache.store(name))
        cache.put(name, result)
    return result


def attack(params, setup: AttackSetup, arm: str, seed: int, steps=STEPS, should_stop=attacks.never,
           cache: MethodCache | None = None) -> dict:
    """Run the steps on one arm, writing attacks/<arm>-s<seed>/<step>.json (and diagnostics.json with
    controls). Raises attacks.SearchStopped when should_stop fires (state and finished methods kept).
    The cache (default: cache_for this arm) is kept; assess removes it once every arm of its job is done."""
    cache = cache or cache_for(params, setup, arm, seed)
    wanted = [("uat", "gradient"), ("hotflip", "gradient")] if "controls" in steps else []
    wanted += [(kind, "gradient") for kind in RUNNERS if kind in steps]
    wanted += [(kind, m) for m in CONTROLS for kind in RUNNERS if "controls" in steps]
    wanted += [(TARGETED, m) for m in TARGETED_METHODS if TARGETED in steps]
    results, seconds = {}, {}
    for key in dict.fromkeys(wanted):
        t0 = time.time()
        results[key] = method_result(params, setup, seed, *key, cache, should_stop)
        seconds[key] = round(time.time() - t0, 1)
    for step in steps:
        if step == "controls":
            payload = {m: {kind: results[kind, m] for kind in RUNNERS} for m in CONTROLS}
            parts = [("random", "uat"), ("random", "hotflip"), ("greedy", "uat"), ("greedy", "hotflip")]
            _write(params, "diagnostics", arm, seed, setup, diagnostics(results), 0.0)
        elif step == TARGETED:
            payload = {m: results[TARGETED, m] for m in TARGETED_METHODS}
            parts = [(m, TARGETED) for m in TARGETED_METHODS]
        else:
            payload, parts = results[step, "gradient"], [("gradient", step)]
        _write(params, step, arm, seed, setup, payload, sum(seconds.get((k, m), 0.0) for m, k in parts))
        _print(step, arm, seed, payload)
    return results


def _write(params, name: str, arm: str, seed: int, setup: AttackSetup, result: dict, seconds: float) -> None:
    """Stamp a result with arm, seed, model meta and provenance; write attacks/<arm>-s<seed>/<name>.json;
    the compute seconds go to the run record."""
    prov = provenance(params, name, seed=seed, arm=arm, precision=setup.precision)
    write_json(attack_dir(arm, seed) / f"{name}.json",
               {**result, "arm": arm, "seed": seed, "model_meta": setup.meta, "provenance": prov})
    record_run(f"{name}-{run_name(arm, seed)}", prov, setup.model, seconds=seconds)


def _print(step: str, arm: str, seed: int, payload: dict) -> None:
    def line(r):
        s = r["summary"]
        return (f"+{s['abs_increase']:.3f} nats/token (success {s['success_rate_abs']:.0%}, "
                f"{s['budget']['forward_passes']}/{s['budget_limit']['forward_passes']} forwards)")
    def targeted(r):
        s = r["summary"]
        return (f"target NLL {s['clean_target_nll']:.3f} -> {s['attacked_target_nll']:.3f}, exact match "
                f"{s['exact_match']:.0%} (clean {s['clean_exact_match']:.0%}), "
                f"{s['budget']['forward_passes']}/{s['budget_limit']['forward_passes']} forwards")
    if step == "controls":
        print(f"controls {arm} s{seed}: " + "; ".join(f"{m} {k} {line(payload[m][k])}"
                                                     for m in CONTROLS for k in RUNNERS))
    elif step == TARGETED:
        print(f"targeted {arm} s{seed}: " + "; ".join(f"{m} {targeted(payload[m])}" for m in TARGETED_METHODS))
    else:
        extra = f" trigger {payload['trigger_text']!r}" if step == "uat" else ""
        print(f"{step} {arm} s{seed}:{extra} {line(payload)}")


def run_stopping(params, setup: AttackSetup, arm: str, seed: int, steps=STEPS, cache: MethodCache | None = None) -> int:
    """attack() under SIGUSR1/SIGTERM stop requests: 0 when done, REQUEUE_EXIT_CODE when stopped."""
    with StopRequests(enabled=True, who="attack") as stops:
        try:
            attack(params, setup, arm, seed, steps, should_stop=lambda: stops.received is not None, cache=cache)
        except attacks.SearchStopped:
            print(f"attack {arm} s{seed}: stopped ({stops.received}); state saved, rerun to resume")
            return REQUEUE_EXIT_CODE
    return 0

