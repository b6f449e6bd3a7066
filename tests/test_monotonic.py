"""The softplus constraint on real tiny GPT-NeoX and Llama models: what it constrains, what it leaves
alone, and that saving, loading and exporting can never silently change or re-initialise weights."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from conftest import run_stage
from pipeline import monotonic as M
from pipeline.models import load_causal_lm, read_meta, save_causal_lm

LAYERS = 2
EPS = 1e-4
NEOX_VARIANTS = ("mlp_in", "mlp_both", "mlp_in_attn_out")
GATED_VARIANTS = ("gated_updown", "gated_all")


def tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.25})
    return GPTNeoXForCausalLM(config).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def source_model(variant: str):
    torch.manual_seed(0)
    model = tiny_llama() if variant.startswith("gated") else tiny_neox()
    with torch.no_grad():   # pretrained-like weights of both signs, well away from zero and from eps
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def expected_modules(model, variant: str) -> set[str]:
    prefix = "model" if variant.startswith("gated") else "gpt_neox"
    return {f"{prefix}.layers.{i}.{suffix}" for i in range(LAYERS) for suffix in M.VARIANT_MODULES[variant]}


def logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def constrained(variant: str, init: str = "abs"):
    source = source_model(variant)
    model = copy.deepcopy(source)   # copying before parametrization is safe
    report = M.apply_monotonic(model, variant, init, EPS)
    return source, model, report


ALL_VARIANTS = NEOX_VARIANTS + GATED_VARIANTS


# --- apply_monotonic ---------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["abs", "clamp"])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_apply_constrains_exactly_the_variant_modules(variant, init):
    source, model, report = constrained(variant, init)
    names = expected_modules(model, variant)
    assert report["ok"] and report["variant"] == variant
    assert report["modules_constrained"] == report["modules_expected"] == LAYERS * len(M.VARIANT_MODULES[variant])
    assert {row["module"] for row in report["modules"]} == names
    assert all(row["parametrized"] and row["min_weight"] >= 0 for row in report["modules"])
    assert report["min_weight"] == min(row["min_weight"] for row in report["modules"]) > 0
    assert "not globally monotone" in report["scope"]

    parametrized = {name for name, m in model.named_modules() if parametrize.is_parametrized(m, "weight")}
    assert parametrized == names
    assert len(M.constrained_parameters(model)) == len(names)

    source_state = source.state_dict()
    untouched = 0
    for name, tensor in model.state_dict().items():
        if name.endswith(M.PARAM_SUFFIX):
            continue
        assert torch.equal(tensor, source_state[name]), f"{name} changed"   # bit-identical
        untouched += 1
    assert untouched == len(source_state) - len(names)

    for name in names:
        w0 = source.get_submodule(name).weight
        w = model.get_submodule(name).weight
        assert bool((w >= 0).all())
        if init == "abs":
            torch.testing.assert_close(w, w0.abs() + EPS, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(w, w0.clamp_min(EPS), rtol=1e-5, atol=1e-6)
            positive = w0 > EPS
            assert positive.any() and (~positive).any()
            torch.testing.assert_close(w[positive], w0[positive], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", NEOX_VARIANTS)
def test_equivalent_init_keeps_the_function_with_every_constrained_weight_at_least_eps(variant):
    source = source_model(variant)
    with torch.no_grad():     # LayerNorm gains of both signs, one of them zero, and non-zero biases
        for layer in source.gpt_neox.layers:
            gain = layer.post_attention_layernorm.weight
            gain.copy_(torch.linspace(-1.5, 1.5, gain.numel()))
            gain[3] = 0.0
    model = copy.deepcopy(source)
    report = M.apply_monotonic(model, variant, "equivalent", EPS)
    assert report["ok"] and report["min_weight"] >= EPS * (1 - 1e-6)
    assert M.nonnegative_share(source, variant) < 1.0 == M.nonnegative_share(model, variant)
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=1e-4)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    error = M.equivalence_error(source, M.export_plain(model), ids)
    assert error["max_abs_logit_diff_fp32"] < 1e-4 < error["logit_scale_max_abs"]
    moved = [n for n in expected_modules(model, variant)
             if not torch.equal(model.get_submodule(n).weight, source.get_submodule(n).weight)]
    assert moved    # the weights did change: only the function is kept
    abs_model = copy.deepcopy(source)
    M.apply_monotonic(abs_model, variant, "abs", EPS)
    assert (logits(abs_model) - logits(source)).abs().max() > 1e-2    # what the damaging init does instead


@pytest.mark.parametrize("variant", GATED_VARIANTS + NEOX_VARIANTS[1:2])
def test_equivalent_init_is_refused_where_the_norm_subtracts_no_mean(variant):
    model = source_model("gated_updown")      # Llama: RMSNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(M.MonotonicityError, match="RMSNorm does not subtract the mean"):
        M.apply_monotonic(model, variant, "equivalent", EPS)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant,model_fn", [("mlp_both", tiny_llama), ("mlp_in_attn_out", tiny_llama),
                                              ("gated_updown", tiny_neox), ("gated_all", tiny_neox)])
def test_variant_that_matches_nothing_is_an_error(variant, model_fn):
    model = model_fn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = LAYERS * len(M.VARIANT_MODULES[variant])
    with pytest.raises(M.MonotonicityError, match=f"'{variant}' matched 0 modules, expected {expected}"):
        M.apply_monotonic(model, variant, "abs", EPS)
    assert not M.is_parametrized(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # left untouched


def test_unknown_variant_and_double_application_are_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        M.apply_monotonic(tiny_neox(), "mlp_out", "abs", EPS)
    _, model, _ = constrained("mlp_in")
    with pytest.raises(M.MonotonicityError, match="already parametrized"):
        M.apply_monotonic(model, "mlp_in", "abs", EPS)


def test_softplus_inverse_needs_positive_weights():
    with pytest.raises(M.MonotonicityError, match="W > 0"):
        M.Softplus().right_inverse(torch.tensor([0.5, 0.0, -1.0]))
    w = torch.tensor([1e-6, 1e-4, 0.3, 5.0, 40.0])
    torch.testing.assert_close(M.Softplus()(M.Softplus().right_inverse(w)), w, rtol=1e-5, atol=0)


# --- verify ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_value", [-1e-3, float("nan")])
def test_verify_fails_on_a_negative_or_nonfinite_constrained_weight(bad_value):
    _, model, _ = constrained("mlp_both")
    plain = M.export_plain(model)
    assert M.verify(plain, "mlp_both")["ok"]
    with torch.no_grad():
        plain.gpt_neox.layers[1].mlp.dense_4h_to_h.weight[3, 5] = bad_value
    with pytest.raises(M.MonotonicityError, match="layers.1.mlp.dense_4h_to_h"):
        M.verify(plain, "mlp_both")
    # an unconstrained module may be negative
    assert M.verify(plain, "mlp_in")["ok"]


def test_verify_detects_a_parametrized_model_gone_negative_through_another_path():
    _, model, _ = constrained("gated_all")
    assert M.verify(model, "gated_all")["ok"]
    plain = M.export_plain(model)
    with torch.no_grad():
        plain.model.layers[0].mlp.gate_proj.weight.neg_()
    with pytest.raises(M.MonotonicityError, match="gate_proj"):
        M.verify(plain, "gated_all")
    assert M.verify(plain, "gated_updown")["ok"]


# --- save / load / export ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_save_load_export_preserve_logits_and_v(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model, _ = constrained(variant)
    reference = logits(model)
    path = tmp_path / "ckpt"
    M.save_parametrized(model, None, path, variant, {"arm": "test"})
    assert read_meta(path)["arm"] == "test"
    assert json.loads((path / "monotonic.json").read_text())["variant"] == variant

    loaded, loaded_variant = M.load_parametrized(path, expected_variant=variant)
    assert loaded_variant == variant and M.is_parametrized(loaded)
    assert torch.equal(logits(loaded), reference)
    saved_v = dict(model.named_parameters())
    for name, v in loaded.named_parameters():
        assert torch.equal(v, saved_v[name]), name            # V and every other parameter exactly

    exported = M.export_plain(model)
    assert not M.is_parametrized(exported)
    assert torch.equal(logits(exported), reference)
    assert M.is_parametrized(model) and torch.equal(logits(model), reference)   # the source is intact

    for plain in (AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True), load_causal_lm(path)):
        assert not M.is_parametrized(plain)
        assert torch.equal(logits(plain.eval()), reference)
        assert M.verify(plain, variant)["ok"]

    with safe_open(str(path / "model.safetensors"), "pt") as fh:   # the plain file holds materialized W
        assert not [k for k in fh.keys() if ".parametrizations." in k]
        for name in expected_modules(model, variant):
            assert torch.equal(fh.get_tensor(f"{name}.weight"), model.get_submodule(name).weight)


def test_load_parametrized_refuses_wrong_variant_and_plain_dirs(tmp_path):
    _, model, _ = constrained("mlp_both")
    M.save_parametrized(model, None, tmp_path / "ckpt", "mlp_both", {})
    with pytest.raises(M.MonotonicityError, match="'mlp_both', params ask for 'mlp_in'"):
        M.load_parametrized(tmp_path / "ckpt", expected_variant="mlp_in")
    save_causal_lm(M.export_plain(model), None, tmp_path / "plain", {})
    with pytest.raises(M.MonotonicityError, match="not a parametrized monotonic checkpoint"):
        M.load_parametrized(tmp_path / "plain", expected_variant="mlp_both")


@pytest.mark.parametrize("tamper", ["weight", "v", "v_missing_key"])
def test_load_parametrized_detects_inconsistent_files(tmp_path, tamper):
    _, model, _ = constrained("mlp_both")
    path = tmp_path / "ckpt"
    M.save_parametrized(model, None, path, "mlp_both", {})
    target = path / ("model.safetensors" if tamper == "weight" else M.STATE_FILE)
    state = load_file(str(target))
    module = "gpt_neox.layers.1.mlp.dense_h_to_4h"
    key = f"{module}.weight" if tamper == "weight" else module + M.PARAM_SUFFIX
    if tamper == "v_missing_key":
        del state[key]
    else:
        state[key] = state[key] + 0.01
    save_file(state, str(target), metadata={"format": "pt"})
    with pytest.raises(M.MonotonicityError, match="differs from softplus|keys differ"):
        M.load_parametrized(path, expected_variant="mlp_both")


def test_parametrized_state_dict_is_refused_by_plain_loader(tmp_path):
    """The unsafe way: a state dict with `.parametrizations.` keys loaded into a plain model would
    re-initialise every constrained weight. load_causal_lm must refuse it, however it is stored."""
    from transformers import AutoModelForCausalLM

    _, model, _ = constrained("mlp_both")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(".parametrizations." in k for k in state)

    single = tmp_path / "single"
    model.config.save_pretrained(str(single))
    save_file(state, str(single / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="softplus-parametrized keys"):
        load_causal_lm(single)
    # what the refusal prevents: plain transformers loads it, with freshly initialised weights
    silent = AutoModelForCausalLM.from_pretrained(str(single), local_files_only=True).eval()
    assert not torch.equal(logits(silent), logits(model))

    sharded = tmp_path / "sharded"
    model.config.save_pretrained(str(sharded))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {k: file for file, shard_keys in shards.items() for k in shard_keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="softplus-parametrized keys"):
        load_causal_lm(sharded)

    pickled = tmp_path / "bin"
    model.config.save_pretrained(str(pickled))
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing_keys"):
        load_causal_lm(pickled)


# --- the verify CLI --------------------------------------------------------------------------------

def test_verify_cli(tmp_path, capsys):
    from pipeline.__main__ import main

    _, model, _ = constrained("mlp_in_attn_out")
    good = tmp_path / "good"
    M.save_parametrized(model, None, good, "mlp_in_attn_out", {})
    assert main(["verify", str(good), "--variant", "mlp_in_attn_out"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["modules_constrained"] == LAYERS * 2 and report["min_weight"] > 0
    assert report["parametrized_state_checked"] and len(report["modules"]) == LAYERS * 2

    # right modules non-negative, but the checkpoint was made for another variant
    assert main(["verify", str(good), "--variant", "mlp_in"]) == 1
    assert "'mlp_in_attn_out', params ask for 'mlp_in'" in capsys.readouterr().err
    # a variant that matches nothing in this architecture
    assert main(["verify", str(good), "--variant", "gated_all"]) == 1
    assert "matched 0 modules" in capsys.readouterr().err

    plain = M.export_plain(model)
    with torch.no_grad():
        plain.gpt_neox.layers[0].attention.dense.weight[0, 0] = -0.5
    bad = tmp_path / "bad"
    save_causal_lm(plain, None, bad, {})
    assert main(["verify", str(bad), "--variant", "mlp_in_attn_out"]) == 1
    assert "layers.0.attention.dense" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "absent"), "--variant", "mlp_both"]) == 1
    assert "FAILED" in capsys.readouterr().err


# --- the monotonic_init stage's real output --------------------------------------------------------

def test_monotonic_init_stage_output(smoke_workspace, smoke_params):
    m = smoke_params.monotonic
    out = smoke_workspace / "outputs" / "models" / "monotonic_init"
    loaded, variant = M.load_parametrized(out, expected_variant=m.variant)
    plain = load_causal_lm(out).eval()
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert M.verify(plain, m.variant)["ok"]
    meta = read_meta(out)
    assert meta["arm"] == "monotonic_init" and meta["variant"] == m.variant and meta["init"] == m.init
    assert meta["provenance"]["params_hash"] == smoke_params.hash()

    pretrained = load_causal_lm(smoke_workspace / "outputs" / "models" / "pretrained").state_dict()
    names = {name for name, _ in M.constrained_modules(plain, m.variant)}
    for key, tensor in plain.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in names and key.endswith(".weight"):
            assert m.init == "abs"
            torch.testing.assert_close(tensor, pretrained[key].abs() + m.eps, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(tensor, pretrained[key]), key

    metrics = json.loads((smoke_workspace / "outputs" / "metrics" / "monotonic_init.json").read_text())
    assert metrics["verify"]["ok"] and metrics["verify"]["modules_constrained"] == len(names)
    assert run_stage(smoke_workspace, "verify", str(out), "--variant", m.variant) == 0
