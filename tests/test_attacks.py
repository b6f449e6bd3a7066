"""Attacks: examples, candidate filtering, the continuation-only loss, the token-gradient core, UAT and
HotFlip against their equal-budget controls, the stages' outputs and the transfer matrix."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_stage
from pipeline import attacks as A
from pipeline import data as D
from pipeline.models import save_causal_lm, tiny_gpt_neox

ARMS_HERE = ("pretrained", "monotonic_init")


def attack_params(params, **changes):
    """params with attack keys replaced; uat/hotflip take dicts of their own keys."""
    a = params.attack
    uat = dataclasses.replace(a.uat, **changes.pop("uat", {}))
    hotflip = dataclasses.replace(a.hotflip, **changes.pop("hotflip", {}))
    return dataclasses.replace(params, attack=dataclasses.replace(a, uat=uat, hotflip=hotflip, **changes))


@pytest.fixture(scope="module")
def trained_workspace(smoke_workspace, tmp_path_factory):
    """The smoke data with a small GPT-NeoX trained well past the unigram stage (the smoke model is
    barely trained, too flat for attacks to separate from random search), saved as the pretrained arm."""
    ws = tmp_path_factory.mktemp("trained")
    shutil.copy(smoke_workspace / "params.yaml", ws / "params.yaml")
    shutil.copytree(smoke_workspace / "outputs" / "data", ws / "outputs" / "data")
    from pipeline import params as P

    params = P.load(ws / "params.yaml")
    data_dir = ws / "outputs" / "data"
    tokenizer = D.load_tokenizer(data_dir / "tokenizer")
    torch.manual_seed(0)
    model = tiny_gpt_neox(dataclasses.replace(params.model, hidden_size=64, intermediate_size=256), tokenizer)
    packed = D.PackedSequences(data_dir, "train", params.data.seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a model this small trains faster on one thread, and a busy machine cannot stall it
    try:
        for step in range(300):
            batch = torch.from_numpy(packed.batch(packed.sequence_ids(0, step * 16, 16)))
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 3.9   # well below the unigram entropy (~5.3 nats)
    save_causal_lm(model, tokenizer, ws / "outputs" / "models" / "pretrained", {"arm": "pretrained", "variant": None})
    return ws


@pytest.fixture
def smoke_setup(smoke_workspace, smoke_params, monkeypatch):
    monkeypatch.chdir(smoke_workspace)
    return A.load_setup(smoke_params, "pretrained", 0)


# --- examples and candidates ----------------------------------------------------------------------------

def test_examples_are_deterministic_windows_in_split_order(smoke_workspace, smoke_params):
    a = smoke_params.attack
    data_dir = smoke_workspace / "outputs" / "data"
    first = A.attack_examples(data_dir, "attack_eval", a.eval_examples, a.prompt_tokens, a.continuation_tokens)
    again = A.attack_examples(data_dir, "attack_eval", a.eval_examples, a.prompt_tokens, a.continuation_tokens)
    assert first.ids == again.ids and torch.equal(first.tokens, again.tokens)
    assert len(set(first.ids)) == a.eval_examples
    keys = [tuple(int(x) for x in i.split(":")[1:]) for i in first.ids]
    assert keys == sorted(keys) and all(i.startswith("attack_eval:") for i in first.ids)
    split = D.TokenSplit(data_dir, "attack_eval")
    width = a.prompt_tokens + a.continuation_tokens
    for (doc, offset), row in zip(keys, first.tokens):
        assert offset % width == 0
        assert np.array_equal(split.document(doc)[offset: offset + width], row.numpy())
    opt = A.attack_examples(data_dir, "attack_opt", a.opt_examples, a.prompt_tokens, a.continuation_tokens)
    assert all(i.startswith("attack_opt:") for i in opt.ids)
    with pytest.raises(ValueError, match="windows"):
        A.attack_examples(data_dir, "attack_eval", 10 ** 6, a.prompt_tokens, a.continuation_tokens)


def test_candidates_exclude_special_and_padded_rows(smoke_workspace, smoke_params):
    tokenizer = D.load_tokenizer(smoke_workspace / "outputs" / "data" / "tokenizer")
    padded_rows = len(tokenizer) + 13          # like Pythia: embedding rows beyond the tokenizer
    ids = A.candidate_ids(tokenizer, padded_rows)
    assert set(ids.tolist()) == set(range(len(tokenizer))) - set(tokenizer.all_special_ids)
    assert A.candidate_ids(tokenizer, 100).max() < 100

    model = tiny_gpt_neox(smoke_params.model, tokenizer)
    model.resize_token_embeddings(padded_rows)
    scorer = A.Scorer(model, 4, 16, ids)
    tokens = torch.randint(2, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    scores, _ = scorer.flip_scores(tokens, torch.arange(5))
    assert scores.shape == (3, 5, padded_rows)
    banned = sorted(set(range(padded_rows)) - set(ids.tolist()))
    assert torch.isneginf(scores[:, :, banned]).all()
    assert torch.isneginf(scores.gather(2, tokens[:, :5].unsqueeze(2))).all()     # no-op "flips" excluded
    assert torch.isfinite(scores[:, :, ids]).sum() == 3 * 5 * (len(ids) - 1)
    found = A.hotflip_search(scorer, tokens, scorer.nll(tokens, count=False), 5, ids, flips=2, topk=4,
                             candidates_per_flip=6, gen=torch.Generator().manual_seed(0), guided=True)
    new_ids = [new for flips in found["flips"] for _, _, new in flips]
    assert new_ids and set(new_ids) <= set(ids.tolist())


# --- the loss and the gradient --------------------------------------------------------------------------

def test_loss_is_on_continuation_tokens_only(smoke_setup, smoke_params):
    """Would catch a mask that scores trigger or prompt tokens (or is off by one)."""
    c = smoke_params.attack.continuation_tokens
    scorer = A.Scorer(smoke_setup.model, c, 8, smoke_setup.candidates)
    trigger = smoke_setup.candidates[:3]
    ids = A.with_trigger(trigger, smoke_setup.eval.tokens[:5])
    logits = smoke_setup.model(input_ids=ids).logits
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    expected = per_token[:, -c:].mean(dim=1).double()
    got = scorer.nll(ids)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, per_token.mean(dim=1).double(), atol=1e-3)           # all targets
    assert not torch.allclose(got, per_token[:, -c - 1:].mean(dim=1).double(), atol=1e-3)  # one too many
    assert scorer.forward_passes == 5 and scorer.backward_passes == 0


def test_flip_scores_are_the_first_order_loss_change(smoke_setup, smoke_params):
    c = smoke_params.attack.continuation_tokens
    model = smoke_setup.model
    scorer = A.Scorer(model, c, 8, smoke_setup.candidates)
    tokens = smoke_setup.eval.tokens[:2]
    positions = torch.tensor([1, 4])
    scores, losses = scorer.flip_scores(tokens, positions)
    embeds = model.get_input_embeddings().weight[tokens].detach().clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[:, -c - 1:-1]
    loss = F.cross_entropy(logits.transpose(1, 2), tokens[:, -c:], reduction="none").mean(dim=1)
    loss.sum().backward()
    E = model.get_input_embeddings().weight.detach()
    for i in range(2):
        for j, p in enumerate(positions.tolist()):
            g = embeds.grad[i, p]
            expected = E @ g - E[tokens[i, p]] @ g
            finite = torch.isfinite(scores[i, j])
            assert torch.allclose(scores[i, j][finite], expected[finite], atol=1e-5)
    assert torch.allclose(losses, loss.detach().double(), atol=1e-6)
    assert scorer.backward_passes == 2 and scorer.forward_passes == 0


# --- attacks against controls ---------------------------------------------------------------------------

ACCEPTANCE = {"eval_examples": 24, "opt_examples": 8, "prompt_tokens": 4,
              "uat": {"trigger_length": 2, "iterations": 3, "restarts": 1, "topk": 4, "candidates_per_step": 8},
              "hotflip": {"flips": 2, "topk": 4, "candidates_per_flip": 6}}


@pytest.fixture(scope="module")
def acceptance_runs(trained_workspace, smoke_params):
    params = attack_params(smoke_params, **copy.deepcopy(ACCEPTANCE))
    cwd = os.getcwd()
    os.chdir(trained_workspace)
    try:
        setup = A.load_setup(params, "pretrained", 0)
        runs = {(kind, method): run(setup, params.attack, 0, method)
                for kind, run in (("uat", A.run_uat), ("hotflip", A.run_hotflip))
                for method in ("gradient", "random", "greedy")}
    finally:
        os.chdir(cwd)
    return setup, params, runs


def test_gradient_attacks_beat_random_controls_at_equal_budget(acceptance_runs):
    _, _, runs = acceptance_runs
    for kind in ("uat", "hotflip"):
        gradient, random = runs[kind, "gradient"]["summary"], runs[kind, "random"]["summary"]
        assert gradient["budget"]["forward_passes"] == random["budget"]["forward_passes"] > 0
        assert gradient["abs_increase"] >= random["abs_increase"] + 0.15, (kind, gradient, random)
        assert gradient["abs_increase"] >= 1.3 * random["abs_increase"], kind
    wins = [g["abs_increase"] > r["abs_increase"] for g, r in
            zip(runs["hotflip", "gradient"]["examples"], runs["hotflip", "random"]["examples"])]
    assert np.mean(wins) > 0.6


def test_budgets_are_equal_and_follow_params(acceptance_runs):
    setup, params, runs = acceptance_runs
    u, h = params.attack.uat, params.attack.hotflip
    n_opt, n_eval = len(setup.opt.ids), len(setup.eval.ids)
    uat_forward = u.restarts * n_opt * (1 + u.iterations * u.candidates_per_step)
    hotflip_forward = n_eval * h.flips * h.candidates_per_flip
    for method in ("gradient", "random", "greedy"):
        backward = method == "gradient"
        assert runs["uat", method]["summary"]["budget"] == {
            "forward_passes": uat_forward, "backward_passes": u.restarts * u.iterations * n_opt if backward else 0}
        assert runs["hotflip", method]["summary"]["budget"] == {
            "forward_passes": hotflip_forward, "backward_passes": h.flips * n_eval if backward else 0}


def test_per_example_results_line_up_with_the_evaluation_split(acceptance_runs):
    setup, params, runs = acceptance_runs
    a = params.attack
    scorer = A.Scorer(setup.model, a.continuation_tokens, a.batch_size, setup.candidates)
    for (kind, method), result in runs.items():
        rows = result["examples"]
        assert [r["id"] for r in rows] == setup.eval.ids, (kind, method)
        clean = torch.tensor([r["clean_nll"] for r in rows], dtype=torch.float64)
        assert torch.allclose(clean, setup.clean_nll)
        for r in rows:
            assert r["abs_increase"] == pytest.approx(r["attacked_nll"] - r["clean_nll"])
            assert r["rel_increase"] == pytest.approx(r["abs_increase"] / r["clean_nll"])
            assert r["success_abs"] == (r["abs_increase"] >= a.success_threshold_nats)
        s = result["summary"]
        assert s["examples"] == len(rows)
        assert s["success_rate_abs"] == pytest.approx(np.mean([r["success_abs"] for r in rows]))
        if kind == "hotflip":
            flips = [r["flips"] for r in rows]
            assert all(0 <= p < a.prompt_tokens for f in flips for p, _, _ in f)
            assert all(len(f) <= a.hotflip.flips and len({p for p, _, _ in f}) == len(f) for f in flips)
            replayed = scorer.nll(A.apply_flips(setup.eval.tokens, flips), count=False)
            assert torch.allclose(replayed, torch.tensor([r["attacked_nll"] for r in rows], dtype=torch.float64),
                                  atol=1e-6)
            assert all(r["abs_increase"] >= -1e-9 for r in rows)   # a flip is kept only if it raises the loss
        else:
            trigger = torch.tensor(result["trigger_ids"])
            assert result["trigger_text"] == setup.tokenizer.decode(result["trigger_ids"])
            assert set(result["trigger_ids"]) <= set(setup.candidates.tolist())
            attacked = scorer.nll(A.with_trigger(trigger, setup.eval.tokens), count=False)
            assert torch.allclose(attacked, torch.tensor([r["attacked_nll"] for r in rows], dtype=torch.float64),
                                  atol=1e-6)


def test_same_seed_same_trigger(acceptance_runs):
    setup, params, runs = acceptance_runs
    again = A.run_uat(setup, params.attack, 0, "gradient")
    assert again["trigger_ids"] == runs["uat", "gradient"]["trigger_ids"]
    assert again["restarts"] == runs["uat", "gradient"]["restarts"]
    other = A.run_uat(setup, params.attack, 1, "gradient")
    assert other["restarts"][0]["trace"] != again["restarts"][0]["trace"]   # a different random start


# --- stages -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_attack_stages_write_the_contract_and_transfer(workspace_copy, smoke_params, monkeypatch):
    ws = workspace_copy
    assert run_stage(ws, "assess", "--arm", *ARMS_HERE, "--seed", "0") == 0     # as dvc.yaml's assess-ref
    outputs = {"evaluate": "eval/{run}/metrics.json", **{name: f"attacks/{{run}}/{name}.json"
                                                         for name in ("uat", "hotflip", "controls")}}

    def read(arm):
        return {name: json.loads((ws / "outputs" / path.format(run=f"{arm}-s0")).read_text())
                for name, path in outputs.items()}

    results = {arm: read(arm) for arm in ARMS_HERE}
    # `assess` (the dvc.yaml stage) writes exactly what its steps write when each runs as its own subcommand
    for step in outputs:
        assert run_stage(ws, step, "--arm", ARMS_HERE[-1], "--seed", "0") == 0, step
    one_by_one = read(ARMS_HERE[-1])
    for step in outputs:
        assert one_by_one[step] == results[ARMS_HERE[-1]][step], step    # hash-stable: equal as a whole
        assert (ws / f"outputs/runs/{step}-{ARMS_HERE[-1]}-s0.json").is_file()   # seconds, host: the run record
    shape = {"clean_nll", "attacked_nll", "abs_increase", "rel_increase", "success_rate_abs",
             "success_rate_rel", "examples", "budget"}
    ids = [r["id"] for r in results["pretrained"]["uat"]["examples"]]
    for arm, res in results.items():
        attacks = [res["uat"], res["hotflip"]] + [res["controls"][m][k] for m in ("random", "greedy")
                                                  for k in ("uat", "hotflip")]
        for result in attacks:
            assert shape <= set(result["summary"]) and [r["id"] for r in result["examples"]] == ids
        for name in ("uat", "hotflip"):
            assert res[name]["provenance"]["params_hash"] == smoke_params.hash()
            assert {res["controls"][m][name]["summary"]["budget"]["forward_passes"] for m in ("random", "greedy")} \
                == {res[name]["summary"]["budget"]["forward_passes"]}
        assert res["uat"]["model_meta"]["arm"] == arm and "trigger_text" in res["uat"]
    assert results["monotonic_init"]["uat"]["model_meta"]["variant"] == smoke_params.monotonic.variant
    # the same budget for every arm
    assert results["pretrained"]["uat"]["summary"]["budget"] == results["monotonic_init"]["uat"]["summary"]["budget"]

    from pipeline.stages.transfer import transfer_matrix

    monkeypatch.chdir(ws)
    matrix = transfer_matrix(smoke_params, 0, ARMS_HERE)
    for name in ("uat", "hotflip"):
        for arm in ARMS_HERE:
            assert matrix[name]["abs_increase"][arm][arm] == pytest.approx(
                results[arm][name]["summary"]["abs_increase"], abs=1e-6)
        assert set(matrix[name]["abs_increase"]["pretrained"]) == set(ARMS_HERE)


def test_monotonic_arm_with_another_variant_fails_loudly(smoke_workspace, smoke_params, monkeypatch):
    from pipeline.loading import load_arm_model

    monkeypatch.chdir(smoke_workspace)
    other = dataclasses.replace(smoke_params, monotonic=dataclasses.replace(smoke_params.monotonic, variant="mlp_in"))
    with pytest.raises(ValueError, match="variant"):
        load_arm_model(other, "monotonic_init", 0)
    model, meta = load_arm_model(smoke_params, "monotonic_init", 0)
    assert meta["variant"] == smoke_params.monotonic.variant


@pytest.mark.parametrize("section,key", [("uat", "candidates_per_step"), ("hotflip", "candidates_per_flip")])
def test_candidate_batch_larger_than_gradient_pool_is_refused_by_the_params_loader(smoke_params, section, key):
    """check-params refuses it, as every stage would (one validator, before any compute)."""
    from pipeline.params import ParamsError, validate

    raw = smoke_params.to_dict()
    raw["attack"][section][key] = 10 ** 4
    with pytest.raises(ParamsError, match=key):
        validate(raw)
