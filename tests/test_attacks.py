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
from pipeline import assessment as S

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
    return S.load_setup(smoke_params, "pretrained", 0)


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
    hotflip = dataclasses.replace(smoke_params.attack.hotflip, flips=2, topk=4, candidates_per_flip=6)
    found = A.hotflip_search(scorer, tokens, scorer.nll(tokens, count=False), prompt_tokens=5, candidates=ids,
                             hotflip=hotflip, gen=torch.Generator().manual_seed(0), guided=True)
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


def test_trigger_placement_before_the_continuation(smoke_setup, smoke_params):
    """The trigger sits between prompt and continuation, and the loss stays on the continuation only."""
    a = smoke_params.attack
    tokens = smoke_setup.eval.tokens[:3]
    trigger = smoke_setup.candidates[:2]
    at = A.trigger_offset("before_continuation", a.prompt_tokens)
    ids = A.with_trigger(trigger, tokens, at)
    assert torch.equal(ids[:, :at], tokens[:, :at]) and torch.equal(ids[:, at:at + 2], trigger.expand(3, -1))
    assert torch.equal(ids[:, at + 2:], tokens[:, at:])
    assert torch.equal(A._triggered_batch(trigger.unsqueeze(0), tokens, at), ids)
    scorer = A.Scorer(smoke_setup.model, a.continuation_tokens, 8, smoke_setup.candidates)
    logits = smoke_setup.model(input_ids=ids).logits
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    assert torch.allclose(scorer.nll(ids), per_token[:, -a.continuation_tokens:].mean(dim=1).double(), atol=1e-5)


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("architecture", ["gpt_neox", "llama"])
@pytest.mark.parametrize("placement", ["before_continuation", "prefix"])
def test_trigger_scoring_reuses_the_prompt_cache_with_the_numbers_of_whole_sequences(smoke_setup, smoke_params,
                                                                                       architecture, placement):
    """Triggers scored over the examples' cached prompt give every whole sequence's NLL (1e-5 nats, fp32),
    chunk boundaries falling inside an example's rows, and count one forward per sequence."""
    a = smoke_params.attack
    model = smoke_setup.model if architecture == "gpt_neox" else tiny_llama(smoke_setup.model.config.vocab_size)
    tokens = smoke_setup.eval.tokens[:5]
    triggers = smoke_setup.candidates[torch.randperm(len(smoke_setup.candidates))[:21]].view(7, 3)
    at = A.trigger_offset(placement, a.prompt_tokens)
    cached = A.Scorer(model, a.continuation_tokens, 8, smoke_setup.candidates)
    whole = A.Scorer(model, a.continuation_tokens, 8, smoke_setup.candidates)
    expected = whole.nll(A._triggered_batch(triggers, tokens, at)).view(7, 5)
    got = cached.trigger_nll(triggers, tokens, at)
    assert got.shape == (7, 5) and cached.forward_passes == whole.forward_passes == 35
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_a_target_is_the_next_examples_continuation(smoke_setup):
    examples, sources = A.targeted_examples(smoke_setup.eval, 3)
    p = smoke_setup.eval.prompt_tokens
    n = len(smoke_setup.eval.ids)
    assert examples.continuation_tokens == 3 and examples.tokens.shape == (n, p + 3)
    assert torch.equal(examples.tokens[:, :p], smoke_setup.eval.tokens[:, :p])
    for i in (0, n - 1):
        assert torch.equal(examples.tokens[i, p:], smoke_setup.eval.tokens[(i + 1) % n, p: p + 3])
        assert sources[i] == smoke_setup.eval.ids[(i + 1) % n]


def test_greedy_match_is_what_greedy_decoding_emits(smoke_setup, smoke_params):
    """Scorer.greedy_match (one teacher-forced forward) agrees with model.generate's greedy decoding, row by row,
    on continuations that are and are not what the model would emit."""
    model, p, k = smoke_setup.model, smoke_params.attack.prompt_tokens, 3
    prompts = smoke_setup.eval.tokens[:6, :p]
    emitted = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=k,
                             min_new_tokens=k, do_sample=False, pad_token_id=0)[:, p:]
    continuations = emitted.clone()
    continuations[1::2, k - 1] = (continuations[1::2, k - 1] + 1) % model.config.vocab_size   # odd rows: last token off
    ids = torch.cat([prompts, continuations, smoke_setup.eval.tokens[:6, p: p + 2]], dim=1)
    scorer = A.Scorer(model, k + 2, 4, smoke_setup.candidates)
    assert scorer.greedy_match(ids, k).tolist() == [True, False] * 3
    assert scorer.greedy_match(ids, k - 1).all()


PLANTED = {"trigger": 7, "target": [11, 12, 13, 14], "vocab": 32, "prompt": 8}


def planted_model():
    """A tiny GPT-NeoX trained on random prompts whose continuation is the planted target exactly when the
    prompt ends in the planted trigger token (else random tokens, never the trigger's or the target's)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=PLANTED["vocab"], hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32)
    model = GPTNeoXForCausalLM(config)
    plain = torch.tensor([t for t in range(PLANTED["vocab"]) if t != PLANTED["trigger"] and t not in PLANTED["target"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        batch = plain[torch.randint(len(plain), (64, PLANTED["prompt"] + 4))]
        planted = torch.rand(64) < 0.5
        batch[planted, PLANTED["prompt"] - 1] = PLANTED["trigger"]
        batch[planted, PLANTED["prompt"]:] = torch.tensor(PLANTED["target"])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), plain


def test_the_targeted_attack_finds_a_planted_trigger(smoke_params):
    """On prompts without the trigger, the targeted search (one flip, every change of its gradient pool scored)
    puts the trigger last and greedy decoding then emits the target on every example; the clean prompts never
    do. The pool (the top 24 of 32 tokens per position by the first-order estimate) must hold the trigger."""
    model, plain = planted_model()
    n, p = 12, PLANTED["prompt"]
    prompts = plain[torch.randint(len(plain), (n, p), generator=torch.Generator().manual_seed(1))]
    tokens = torch.cat([prompts, torch.tensor(PLANTED["target"]).expand(n, -1)], dim=1)
    params = attack_params(smoke_params, prompt_tokens=p, continuation_tokens=4,
                           hotflip={"flips": 1, "steps": 2, "patience": 1, "topk": 24, "candidates_per_flip": 8 * 24})
    a = dataclasses.replace(params.attack, targeted=dataclasses.replace(params.attack.targeted, target_tokens=4,
                                                                        match_tokens=4))
    candidates = torch.arange(PLANTED["vocab"])
    examples = A.Examples([f"planted:{i}:0" for i in range(n)], tokens, p, 4)
    setup = S.AttackSetup(model, {}, None, candidates, examples, examples, torch.zeros(n), "fp32")
    result = S.run_targeted(setup, a, 0, "gradient")
    summary = result["summary"]
    assert summary["clean_exact_match"] == 0.0 and summary["exact_match"] == 1.0, summary
    assert summary["attacked_target_nll"] < summary["clean_target_nll"] - 1.0
    assert all(row["flips"] == [[p - 1, int(prompts[i, -1]), PLANTED["trigger"]]]
               for i, row in enumerate(result["examples"]))
    assert summary["budget"]["forward_passes"] <= summary["budget_limit"]["forward_passes"] == 2 * 8 * 24 * n


# --- attacks against controls ---------------------------------------------------------------------------

ACCEPTANCE = {"eval_examples": 24, "opt_examples": 8, "prompt_tokens": 4,
              "uat": {"trigger_length": 2, "iterations": 4, "restarts": 1, "patience": 2, "topk": 8,
                      "candidates_per_step": 16},
              "hotflip": {"flips": 2, "steps": 4, "patience": 2, "topk": 8, "candidates_per_flip": 16}}
METHODS = ("gradient", "random", "greedy")


@pytest.fixture(scope="module")
def acceptance_runs(trained_workspace, smoke_params):
    params = attack_params(smoke_params, **copy.deepcopy(ACCEPTANCE))
    cwd = os.getcwd()
    os.chdir(trained_workspace)
    try:
        setup = S.load_setup(params, "pretrained", 0)
        runs = {(kind, method): S.RUNNERS[kind](setup, params.attack, 0, method)
                for kind in S.RUNNERS for method in METHODS}
    finally:
        os.chdir(cwd)
    return setup, params, runs


def test_gradient_attacks_beat_random_controls_at_equal_budget(acceptance_runs):
    _, _, runs = acceptance_runs
    for kind in ("uat", "hotflip"):
        gradient, random = runs[kind, "gradient"]["summary"], runs[kind, "random"]["summary"]
        assert gradient["budget_limit"]["forward_passes"] == random["budget_limit"]["forward_passes"] \
            == random["budget"]["forward_passes"] >= gradient["budget"]["forward_passes"] > 0
        assert gradient["abs_increase"] >= random["abs_increase"] + 0.15, (kind, gradient, random)
        assert gradient["abs_increase"] >= 1.3 * random["abs_increase"], kind
    wins = [g["abs_increase"] > r["abs_increase"] for g, r in
            zip(runs["hotflip", "gradient"]["examples"], runs["hotflip", "random"]["examples"])]
    assert np.mean(wins) > 0.6


def test_budgets_follow_params_and_count_the_passes_used(acceptance_runs):
    setup, params, runs = acceptance_runs
    u, h = params.attack.uat, params.attack.hotflip
    n_opt, n_eval = len(setup.opt.ids), len(setup.eval.ids)
    uat_cap = u.restarts * n_opt * (1 + u.iterations * u.candidates_per_step)
    hotflip_cap = n_eval * h.steps * h.candidates_per_flip
    for method in METHODS:
        gradient = method == "gradient"
        assert runs["uat", method]["summary"]["budget_limit"] == {
            "forward_passes": uat_cap, "backward_passes": u.restarts * u.iterations * n_opt if gradient else 0}
        assert runs["hotflip", method]["summary"]["budget_limit"] == {
            "forward_passes": hotflip_cap, "backward_passes": h.steps * n_eval if gradient else 0}
        for kind in S.RUNNERS:   # the curve ends at the passes used
            r = runs[kind, method]
            assert r["budget_curve"][-1][0] == r["summary"]["budget"]["forward_passes"]
    for method in ("gradient", "greedy"):   # UAT: exact counts from the steps each restart took
        steps = sum(len(r["trace"]) - 1 for r in runs["uat", method]["restarts"])
        assert all(len(r["trace"]) - 1 <= u.iterations for r in runs["uat", method]["restarts"])
        assert runs["uat", method]["summary"]["budget"] == {
            "forward_passes": n_opt * (u.restarts + steps * u.candidates_per_step),
            "backward_passes": n_opt * steps if method == "gradient" else 0}
    hotflip = runs["hotflip", "gradient"]["summary"]["budget"]
    assert hotflip["backward_passes"] <= h.steps * n_eval and hotflip["forward_passes"] <= hotflip_cap


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
            at = A.trigger_offset(a.uat.placement, a.prompt_tokens)
            attacked = scorer.nll(A.with_trigger(trigger, setup.eval.tokens, at), count=False)
            assert torch.allclose(attacked, torch.tensor([r["attacked_nll"] for r in rows], dtype=torch.float64),
                                  atol=1e-6)


def test_hotflip_revisits_positions_within_its_edit_budget(acceptance_runs):
    """With more steps than flips, some example changes a position twice (the budget is positions, not steps)."""
    setup, params, runs = acceptance_runs
    h = params.attack.hotflip
    a = dataclasses.replace(params.attack, hotflip=dataclasses.replace(h, flips=1, steps=6, patience=6))
    result = S.run_hotflip(setup, a, 0, "gradient")
    assert all(len(r["flips"]) <= 1 for r in result["examples"])
    single = S.run_hotflip(setup, dataclasses.replace(a, hotflip=dataclasses.replace(a.hotflip, steps=1)), 0, "gradient")
    assert result["summary"]["abs_increase"] > single["summary"]["abs_increase"]


def test_same_seed_same_trigger(acceptance_runs):
    setup, params, runs = acceptance_runs
    again = S.run_uat(setup, params.attack, 0, "gradient")
    assert again["trigger_ids"] == runs["uat", "gradient"]["trigger_ids"]
    assert again["restarts"] == runs["uat", "gradient"]["restarts"]
    other = S.run_uat(setup, params.attack, 1, "gradient")
    assert other["restarts"][0]["trace"] != again["restarts"][0]["trace"]   # a different random start


def test_diagnostics_and_worst_case(acceptance_runs, smoke_params):
    """Gradient vs greedy read from the curves at an equal forward count; the rank correlation of
    first-order scores and true loss changes is a Spearman correlation; the worst case is at least every
    method."""
    from pipeline.stages.transfer import worst_case

    setup, params, runs = acceptance_runs
    diag = S.diagnostics(runs)
    for kind in S.RUNNERS:
        d = diag[kind]["gradient_vs_greedy"]
        assert d["forward_passes"] <= min(runs[kind, m]["summary"]["budget"]["forward_passes"] for m in ("gradient", "greedy"))
        assert d["gradient"] == A.curve_at(runs[kind, "gradient"]["budget_curve"], d["forward_passes"])
        assert -1 <= diag[kind]["first_order_rank_correlation"] <= 1
        curves = diag[kind]["budget_curves"]
        assert all(np.diff([v for v in curves["gradient"] if v is not None]) >= 0)   # best so far
    assert A.rank_correlation(torch.tensor([1., 2, 3, 4]), torch.tensor([10., 20, 30, 45])) == pytest.approx(1)
    assert A.rank_correlation(torch.tensor([1., 2, 3, 4]), torch.tensor([4., 3, 2, 1])) == pytest.approx(-1)
    attacked = {m: torch.tensor([r["attacked_nll"] for r in runs["hotflip", m]["examples"]], dtype=torch.float64)
                for m in METHODS}
    worst = worst_case(params, setup, attacked)
    for m in METHODS:
        for w, r in zip(worst["examples"], runs["hotflip", m]["examples"]):
            assert w["abs_increase"] >= r["abs_increase"] - 1e-12
        assert worst["summary"]["abs_increase"] >= worst["methods"][m] - 1e-12
    assert {w["worst_method"] for w in worst["examples"]} <= set(METHODS)


# --- exhaustive oracles ------------------------------------------------------------------------------

def default_budget_params(params, **changes):
    """The embedded profile's search budgets (topk, candidates, steps, patience) on these examples."""
    from pipeline import params as P

    emb = P.load(P.profile_path("embedded")).attack
    return attack_params(params, eval_examples=8, opt_examples=8, prompt_tokens=4,
                         uat={**dataclasses.asdict(emb.uat), "batch_size": 64, **changes.get("uat", {})},
                         hotflip={**dataclasses.asdict(emb.hotflip), **changes.get("hotflip", {})})


@pytest.mark.slow
def test_single_flip_search_reaches_the_oracle(trained_workspace, smoke_params, monkeypatch):
    """Gradient HotFlip with one flip at the default budget reaches >= 0.9 of the best single flip's mean
    NLL increase, found by scoring every prompt position x every candidate."""
    monkeypatch.chdir(trained_workspace)
    params = default_budget_params(smoke_params, hotflip={"flips": 1})
    a = params.attack
    setup = S.load_setup(params, "pretrained", 0)
    scorer = A.Scorer(setup.model, a.continuation_tokens, 256, setup.candidates)
    oracle = A.oracle_single_flip(scorer, setup.eval.tokens, prompt_tokens=a.prompt_tokens, candidates=setup.candidates)
    assert scorer.forward_passes == len(setup.eval.ids) * a.prompt_tokens * len(setup.candidates)
    best = (oracle["nll"] - setup.clean_nll).mean().item()
    found = S.run_hotflip(setup, a, 0, "gradient")["summary"]["abs_increase"]
    assert best > 0 and found <= best + 1e-9
    assert found >= 0.9 * best, (found, best)


def test_one_token_trigger_search_reaches_the_oracle(trained_workspace, smoke_params, monkeypatch):
    """One-token UAT at the default budget reaches >= 0.95 of the best one-token trigger's increase of the
    optimisation objective (every candidate scored)."""
    monkeypatch.chdir(trained_workspace)
    params = default_budget_params(smoke_params, uat={"trigger_length": 1})
    a = params.attack
    setup = S.load_setup(params, "pretrained", 0)
    scorer = A.Scorer(setup.model, a.continuation_tokens, 256, setup.candidates)
    at = A.trigger_offset(a.uat.placement, a.prompt_tokens)
    oracle = A.oracle_trigger(scorer, setup.opt.tokens, candidates=setup.candidates, at=at)
    clean = scorer.nll(setup.opt.tokens, count=False).mean().item()
    result = S.run_uat(setup, a, 0, "gradient")
    assert result["opt_nll"] <= oracle["opt_nll"] + 1e-9
    assert result["opt_nll"] - clean >= 0.95 * (oracle["opt_nll"] - clean), (result["opt_nll"], oracle, clean)


# --- resumable searches -------------------------------------------------------------------------------

def stop_after(k: int):
    calls = iter(range(10 ** 9))
    return lambda: next(calls) >= k


@pytest.mark.parametrize("kind", ["uat", "hotflip"])
@pytest.mark.parametrize("method", ["gradient", "random"])
def test_stopped_search_resumes_bit_identical(acceptance_runs, tmp_path, kind, method):
    """The searches and the random controls (polled per chunk of draws) alike."""
    setup, params, runs = acceptance_runs
    store = A.StateStore(tmp_path / "state.pt")
    with pytest.raises(A.SearchStopped):
        S.RUNNERS[kind](setup, params.attack, 0, method, should_stop=stop_after(3), store=store)
    assert store.path.exists()
    resumed = S.RUNNERS[kind](setup, params.attack, 0, method, store=store)
    assert resumed == runs[kind, method]              # results, budgets, curves, correlations: all equal


def test_search_state_is_written_atomically_and_durably(tmp_path, monkeypatch):
    """StateStore writes through pipeline.io: temp name, fsync, rename (no temp file left behind)."""
    from pipeline import io

    synced, fsync = [], os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    store = A.StateStore(tmp_path / "state.pt")
    store.save({"rng": torch.Generator().manual_seed(1).get_state(), "step": 3})
    assert synced and os.listdir(tmp_path) == ["state.pt"]
    assert store.load()["step"] == 3


@pytest.mark.slow
def test_stopped_stage_keeps_finished_methods_and_ends_identical(acceptance_runs, tmp_path, monkeypatch):
    """attack(): a stop mid-way keeps finished methods' results and the stopped search's state under the
    fingerprint directory; the rerun computes only the rest, writes what an uninterrupted run writes and
    keeps every method's result."""
    setup, params, runs = acceptance_runs
    monkeypatch.chdir(tmp_path)
    cache = S.cache_for(params, setup, "pretrained", 0)
    with pytest.raises(A.SearchStopped):
        S.attack(params, setup, "pretrained", 0, should_stop=stop_after(8))
    assert cache.result("uat-gradient") == runs["uat", "gradient"] and cache.store("hotflip-gradient").path.exists()
    S.attack(params, setup, "pretrained", 0)
    assert all(cache.result(f"{k}-{m}") == runs[k, m] for k in S.RUNNERS for m in METHODS)   # assess clears it
    written = json.loads((tmp_path / "outputs/attacks/pretrained-s0/controls.json").read_text())
    assert written["greedy"]["hotflip"]["examples"] == runs["hotflip", "greedy"]["examples"]
    hotflip = json.loads((tmp_path / "outputs/attacks/pretrained-s0/hotflip.json").read_text())
    assert hotflip["summary"] == runs["hotflip", "gradient"]["summary"]
    other = dataclasses.replace(params, attack=dataclasses.replace(params.attack, eval_examples=8))
    assert S.fingerprint(other, setup, "pretrained", 0) != cache.root.name


def test_fingerprint_covers_the_example_sets_and_the_candidate_pool(smoke_setup, smoke_params):
    base = S.fingerprint(smoke_params, smoke_setup, "pretrained", 0)
    changed = {"opt": dataclasses.replace(smoke_setup.opt, tokens=smoke_setup.opt.tokens.flip(0)),
               "eval": dataclasses.replace(smoke_setup.eval, tokens=smoke_setup.eval.tokens.flip(0)),
               "candidates": smoke_setup.candidates[:-1]}
    for field, value in changed.items():
        assert S.fingerprint(smoke_params, dataclasses.replace(smoke_setup, **{field: value}), "pretrained", 0) != base, field


# --- stages -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_attack_stages_write_the_contract_and_transfer(workspace_copy, smoke_params, monkeypatch):
    ws = workspace_copy
    assert run_stage(ws, "assess", "--arm", *ARMS_HERE, "--seed", "0") == 0     # two arms in one process
    outputs = {"evaluate": "eval/{run}/metrics.json", **{name: f"attacks/{{run}}/{name}.json"
                                                         for name in ("uat", "hotflip", "controls", "diagnostics",
                                                                      "targeted")}}

    def read(arm):
        return {name: json.loads((ws / "outputs" / path.format(run=f"{arm}-s0")).read_text())
                for name, path in outputs.items()}

    results = {arm: read(arm) for arm in ARMS_HERE}
    # `assess` (the dvc.yaml stage) writes exactly what its steps write when each runs as its own subcommand
    for step in ("evaluate", "uat", "hotflip", "controls", "targeted"):
        assert run_stage(ws, step, "--arm", ARMS_HERE[-1], "--seed", "0") == 0, step
    one_by_one = read(ARMS_HERE[-1])
    for step in outputs:
        assert one_by_one[step] == results[ARMS_HERE[-1]][step], step    # hash-stable: equal as a whole
        assert (ws / f"outputs/runs/{step}-{ARMS_HERE[-1]}-s0.json").is_file()   # seconds, host: the run record
    shape = {"clean_nll", "attacked_nll", "abs_increase", "rel_increase", "success_rate_abs",
             "success_rate_rel", "examples", "budget", "budget_limit"}
    ids = [r["id"] for r in results["pretrained"]["uat"]["examples"]]
    for arm, res in results.items():
        attacks = [res["uat"], res["hotflip"]] + [res["controls"][m][k] for m in ("random", "greedy")
                                                  for k in ("uat", "hotflip")]
        for result in attacks:
            assert shape <= set(result["summary"]) and [r["id"] for r in result["examples"]] == ids
        for name in ("uat", "hotflip"):
            assert res[name]["provenance"]["params_hash"] == smoke_params.hash()
            assert {res["controls"][m][name]["summary"]["budget_limit"]["forward_passes"] for m in ("random", "greedy")} \
                == {res[name]["summary"]["budget_limit"]["forward_passes"]}
        assert res["uat"]["model_meta"]["arm"] == arm and "trigger_text" in res["uat"]
    assert results["monotonic_init"]["uat"]["model_meta"]["variant"] == smoke_params.monotonic.variant
    # the same hard budget for every arm
    assert results["pretrained"]["uat"]["summary"]["budget_limit"] == results["monotonic_init"]["uat"]["summary"]["budget_limit"]

    from pipeline.stages.transfer import transfer_matrix

    monkeypatch.chdir(ws)
    matrix, _ = transfer_matrix(smoke_params, 0, ARMS_HERE)
    for name in ("uat", "hotflip"):
        for arm in ARMS_HERE:
            assert matrix[name]["abs_increase"][arm][arm] == pytest.approx(
                results[arm][name]["summary"]["abs_increase"], abs=1e-6)
            worst = matrix["worst_case"][name][arm]
            columns = {"gradient": results[arm][name], **{m: results[arm]["controls"][m][name] for m in ("random", "greedy")}}
            assert set(worst["methods"]) == {*columns, *(f"transfer_from_{o}" for o in ARMS_HERE if o != arm)}
            for method, res in columns.items():   # the worst-case column is at least every method's column
                assert all(w["abs_increase"] >= r["abs_increase"] - 1e-12
                           for w, r in zip(worst["examples"], res["examples"]))
                assert worst["summary"]["abs_increase"] >= res["summary"]["abs_increase"] - 1e-12
        assert set(matrix[name]["abs_increase"]["pretrained"]) == set(ARMS_HERE)


def test_monotonic_arm_with_another_variant_fails_loudly(smoke_workspace, smoke_params, monkeypatch):
    from pipeline.loading import load_arm_model

    monkeypatch.chdir(smoke_workspace)
    other = dataclasses.replace(smoke_params, monotonic=dataclasses.replace(smoke_params.monotonic, variant="mlp_in"))
    with pytest.raises(ValueError, match="variant"):
        load_arm_model(other, "monotonic_init", 0)
    model, meta = load_arm_model(smoke_params, "monotonic_init", 0)
    assert meta["variant"] == smoke_params.monotonic.variant


@pytest.mark.parametrize("section,key,value", [("uat", "candidates_per_step", 10 ** 4),
                                               ("hotflip", "candidates_per_flip", 10 ** 4),
                                               ("uat", "patience", 10 ** 4), ("hotflip", "patience", 10 ** 4),
                                               ("uat", "placement", "suffix")])
def test_bad_search_params_are_refused_by_the_params_loader(smoke_params, section, key, value):
    """check-params refuses them, as every stage would (one validator, before any compute)."""
    from pipeline.params import ParamsError, validate

    raw = smoke_params.to_dict()
    raw["attack"][section][key] = value
    with pytest.raises(ParamsError, match=key):
        validate(raw)


@pytest.mark.slow
def test_assess_stopped_by_the_stop_file_requeues_and_resumes_to_the_same_outputs(workspace_copy, tmp_path,
                                                                                 monkeypatch, capsys):
    """The real stop request (the batch script's stop file, polled at every search step), mid-search in the
    second arm of a two-arm `assess`: it exits with the requeue code, the rerun skips the finished first arm
    (no evaluate, no attack) and ends with exactly the outputs of an uninterrupted run, caches removed."""
    import shutil

    from pipeline import stopping
    from pipeline.stopping import REQUEUE_EXIT_CODE, STOP_FILE_ENV

    argv = ("assess", "--arm", *ARMS_HERE, "--seed", "0")
    reference = tmp_path / "reference"
    shutil.copytree(workspace_copy, reference)
    assert run_stage(reference, *argv) == 0
    stop = tmp_path / "stop-requests" / "job-1"
    stop.parent.mkdir()
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    first_done = workspace_copy / f"outputs/attacks/{ARMS_HERE[0]}-s0/diagnostics.json"
    polls, poll = [], stopping.stop_requested

    def file_appears_at_the_sixth_poll_of_the_second_arm():     # the batch script's request, at a fixed point
        polls.append(first_done.exists())
        if sum(polls) == 6:
            stop.touch()
        return poll()

    monkeypatch.setattr(stopping, "stop_requested", file_appears_at_the_sixth_poll_of_the_second_arm)
    assert run_stage(workspace_copy, *argv) == REQUEUE_EXIT_CODE
    assert sum(polls) == 6
    stop.unlink()                                  # stage.sbatch clears it at the start of the next attempt
    capsys.readouterr()
    assert run_stage(workspace_copy, *argv) == 0
    log = capsys.readouterr().out
    assert f"assess {ARMS_HERE[0]} s0: finished by an earlier attempt" in log
    assert f"evaluate {ARMS_HERE[0]} s0" not in log and f"uat {ARMS_HERE[0]} s0" not in log
    assert f"uat {ARMS_HERE[1]} s0" in log
    for arm in ARMS_HERE:
        for path in (f"outputs/eval/{arm}-s0/metrics.json", f"outputs/eval/{arm}-s0/per_doc.json",
                     *(f"outputs/attacks/{arm}-s0/{name}.json" for name in ("uat", "hotflip", "controls", "diagnostics"))):
            assert (workspace_copy / path).read_bytes() == (reference / path).read_bytes(), path
    assert not list((workspace_copy / "outputs/checkpoints").glob("*/assess/*"))


def test_a_uat_step_without_improvement_reuses_the_gradient_and_scores_only_untried_changes(smoke_setup,
                                                                                           smoke_params):
    """The trigger is unchanged after a step without improvement, and so is its gradient: the search takes no
    new gradient pass and draws changes it has not yet scored against this trigger. Once the whole pool is
    scored without improvement the restart ends (a local optimum over the pool). Before: the pool was redrawn
    at random, so patience 2 re-scored the same changes when the pool held no more than a step's draw."""
    uat = dataclasses.replace(smoke_params.attack.uat, trigger_length=2, topk=4, candidates_per_step=3,
                              iterations=40, patience=40, restarts=1)
    scorer = A.Scorer(smoke_setup.model, smoke_params.attack.continuation_tokens, 256, smoke_setup.candidates)
    tokens, at = smoke_setup.opt.tokens[:4], smoke_params.attack.prompt_tokens
    events = []                                          # ("gradient", trigger) and ("scored", proposals), in order
    flip_scores, nll = scorer.flip_scores, scorer.nll

    def spy_flip_scores(ids, positions):
        events.append(("gradient", tuple(ids[0, at: at + uat.trigger_length].tolist())))
        return flip_scores(ids, positions)

    def spy_nll(ids, count=True):
        events.append(("scored", [tuple(r) for r in ids[::len(tokens), at: at + uat.trigger_length].tolist()]))
        return nll(ids, count)
    scorer.flip_scores, scorer.nll = spy_flip_scores, spy_nll
    found = A.uat_search(scorer, tokens, candidates=smoke_setup.candidates, uat=uat, at=at,
                         gen=A.generator(0, "uat"), guided=True)
    trace = found["restarts"][0]["trace"]
    improvements = sum(b > a for a, b in zip(trace, trace[1:]))
    gradients = [trigger for kind, trigger in events if kind == "gradient"]
    assert len(gradients) == 1 + improvements            # one gradient per trigger the search stood on
    segments, standing = {}, None                        # the changes scored while standing on each trigger
    for kind, value in events:                           # the first event: the initial trigger's own loss
        if kind == "gradient":
            standing = segments.setdefault(value, [])
        elif standing is not None:
            standing.extend(value)
    for trigger, proposals in segments.items():
        assert all(sum(a != b for a, b in zip(p, trigger)) == 1 for p in proposals)
        assert len(proposals) == len(set(proposals)) <= uat.trigger_length * uat.topk
    assert len(trace) - 1 < uat.iterations               # the last trigger's pool ran out: the restart ended


def test_a_single_flip_search_can_move_its_edit_to_another_position(smoke_setup, smoke_params):
    """At the edit budget (one flip) the search refines its changed position; after a step without improvement it
    also tries changes at other positions, each reverting the old edit, so every scored sequence stays within one
    flip of the original. Before: once a step scored only refinements of one position, every later step did too."""
    h = dataclasses.replace(smoke_params.attack.hotflip, flips=1, steps=8, patience=8)
    p = smoke_params.attack.prompt_tokens
    scorer = A.Scorer(smoke_setup.model, smoke_params.attack.continuation_tokens, 256, smoke_setup.candidates)
    tokens = smoke_setup.eval.tokens[:6]
    clean = scorer.nll(tokens, count=False)
    steps, nll = [], scorer.nll                           # per step: example -> positions edited in its candidates

    def spy_nll(ids, count=True):
        edited = {}
        for row in ids:
            example = next(i for i in range(len(tokens)) if torch.equal(row[p:], tokens[i, p:]))
            differs = torch.nonzero(row[:p] != tokens[example, :p]).flatten().tolist()
            assert len(differs) <= 1                      # within the edit budget, moves included
            edited.setdefault(example, set()).update(differs)
        steps.append(edited)
        return nll(ids, count)
    scorer.nll = spy_nll
    found = A.hotflip_search(scorer, tokens, clean, prompt_tokens=p, candidates=smoke_setup.candidates, hotflip=h,
                             gen=A.generator(0, "hotflip"), guided=True)
    assert all(len(f) <= 1 for f in found["flips"])
    moved = [i for i in range(len(tokens)) for a, b in zip(steps, steps[1:])
             if len(a.get(i, ())) == 1 and b.get(i, set()) - a[i]]      # refining one position, then elsewhere
    assert moved


def test_a_move_at_the_edit_budget_reverts_one_changed_position():
    original = torch.tensor([[1, 2, 3, 4, 9], [1, 2, 3, 4, 9]])
    seqs = torch.tensor([[7, 2, 8, 4, 9], [7, 2, 3, 4, 9]])    # row 0: a move to 2 at budget; row 1: under it
    changed = torch.tensor([[True, False, False, False], [False, False, False, False]])
    A._within_budget(seqs, original, changed, torch.tensor([2, 0]), 1, torch.Generator().manual_seed(0))
    assert seqs.tolist() == [[1, 2, 8, 4, 9], [7, 2, 3, 4, 9]]
