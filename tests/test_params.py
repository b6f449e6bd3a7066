"""params.yaml loader: every bad value fails before compute, naming the key, the value and what is
allowed; the CLI exits 2 and leaves every existing output untouched; the profiles stay in shape."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import subprocess
import sys
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_stage
from pipeline import params as P
from pipeline.__main__ import STAGES

PARAMS_YAML = REPO / "params.yaml"
PROFILE_FILES = sorted((REPO / "profiles").glob("*.yaml"))


def base_raw() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


def set_key(raw: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = raw
    for name in parents:
        node = node[name]
    node[last] = value
    return raw


def del_key(raw: dict, dotted: str) -> dict:
    *parents, last = dotted.split(".")
    node = raw
    for name in parents:
        node = node[name]
    del node[last]
    return raw


def fractions(**changes) -> dict:
    out = {"train": 0.8, "validation": 0.05, "test": 0.05, "attack_opt": 0.05, "attack_eval": 0.05, **changes}
    return {k: v for k, v in out.items() if v is not None}


# (id, edit of the default params, the key the error must name, the bad value it must show,
#  a fragment of what it must say is allowed)
BAD_CASES = [
    ("unknown-top-level-key", lambda r: set_key(r, "learning_rate", 0.1), "learning_rate", 0.1, "known keys"),
    ("unknown-nested-key", lambda r: set_key(r, "train.lr_schedule", "cosine"), "train.lr_schedule", "cosine",
     "known keys: max_steps"),
    ("unknown-key-deep", lambda r: set_key(r, "attack.uat.length", 3), "attack.uat.length", 3, "trigger_length"),
    ("string-for-int", lambda r: set_key(r, "pretrain.steps", "800"), "pretrain.steps", "800", "an integer"),
    ("bool-for-int", lambda r: set_key(r, "train.max_steps", True), "train.max_steps", True, "an integer"),
    ("float-for-int", lambda r: set_key(r, "train.batch_size", 16.0), "train.batch_size", 16.0, "an integer"),
    ("string-for-float", lambda r: set_key(r, "train.lr", "fast"), "train.lr", "fast", "a number"),
    ("nan-lr", lambda r: set_key(r, "train.lr", float("nan")), "train.lr", float("nan"), "finite"),
    ("negative-lr", lambda r: set_key(r, "train.lr", -1e-3), "train.lr", -1e-3, "> 0"),
    ("zero-lr", lambda r: set_key(r, "pretrain.lr", 0), "pretrain.lr", 0, "> 0"),
    ("warmup-ratio-one", lambda r: set_key(r, "train.warmup_ratio", 1.0), "train.warmup_ratio", 1.0, "[0, 1)"),
    ("warmup-ratio-negative", lambda r: set_key(r, "pretrain.warmup_ratio", -0.1), "pretrain.warmup_ratio", -0.1,
     "[0, 1)"),
    ("adam-beta2-zero", lambda r: set_key(r, "train.adam_beta2", 0.0), "train.adam_beta2", 0.0, "(0, 1)"),
    ("trigger-length-zero", lambda r: set_key(r, "attack.uat.trigger_length", 0), "attack.uat.trigger_length", 0,
     ">= 1"),
    ("unknown-variant", lambda r: set_key(r, "monotonic.variant", "mlp_out"), "monotonic.variant", "mlp_out",
     "'mlp_both'"),
    ("unknown-init", lambda r: set_key(r, "monotonic.init", "zero"), "monotonic.init", "zero", "'clamp'"),
    ("unknown-profile-name", lambda r: set_key(r, "profile", "laptop"), "profile", "laptop", "'cluster'"),
    ("gated-variant-on-gpt-neox", lambda r: set_key(r, "monotonic.variant", "gated_all"), "monotonic.variant",
     "gated_all", "GPT-NeoX"),
    ("equivalent-init-on-rmsnorm", lambda r: set_key(set_key(r, "monotonic.variant", "gated_updown"),
                                                     "monotonic.init", "equivalent"),
     "monotonic.init", "equivalent", "needs a LayerNorm"),
    ("unknown-arm-override", lambda r: set_key(r, "train.arm_overrides", {"pretrained": {"lr": 1e-4}}),
     "train.arm_overrides.pretrained", {"lr": 1e-4}, "baseline, monotonic"),
    ("unknown-key-in-override", lambda r: set_key(r, "train.arm_overrides", {"monotonic": {"learning_rate": 1e-4}}),
     "train.arm_overrides.monotonic.learning_rate", 1e-4, "a train key"),
    ("bad-value-in-override", lambda r: set_key(r, "train.arm_overrides", {"baseline": {"lr": -1.0}}),
     "train.arm_overrides.baseline.lr", -1.0, "> 0"),
    ("override-not-a-mapping", lambda r: set_key(r, "train.arm_overrides", {"baseline": 5}),
     "train.arm_overrides.baseline", 5, "a mapping"),
    ("empty-seeds", lambda r: set_key(r, "seeds", []), "seeds", [], "non-empty"),
    ("duplicate-seeds", lambda r: set_key(r, "seeds", [0, 1, 0]), "seeds", [0, 1, 0], "distinct"),
    ("negative-seed", lambda r: set_key(r, "seeds", [0, -1]), "seeds", [0, -1], "integers in [0, 2**32)"),
    ("fractions-not-summing-to-1", lambda r: set_key(r, "data.fractions", fractions(train=0.9)),
     "data.fractions", fractions(train=0.9), "summing to 1"),
    ("fraction-missing-split", lambda r: set_key(r, "data.fractions", fractions(attack_eval=None, train=0.85)),
     "data.fractions", fractions(attack_eval=None, train=0.85), "attack_eval"),
    ("fraction-zero", lambda r: set_key(r, "data.fractions", fractions(train=0.85, test=0.0)),
     "data.fractions.test", 0.0, "(0, 1)"),
    ("missing-required-key", lambda r: del_key(r, "train.lr"), "train.lr", "<missing>", "required"),
    ("missing-section", lambda r: del_key(r, "attack"), "attack", "<missing>", "prompt_tokens"),
    ("section-not-a-mapping", lambda r: set_key(r, "eval", 5), "eval", 5, "a mapping"),
    ("seq-len-over-positions", lambda r: set_key(r, "data.seq_len", 256), "data.seq_len", 256,
     "max_position_embeddings (128)"),
    ("context-over-positions", lambda r: set_key(r, "eval.context_length", 512), "eval.context_length", 512,
     "max_position_embeddings"),
    ("stride-over-context", lambda r: set_key(r, "eval.stride", 129), "eval.stride", 129, "eval.context_length"),
    ("heads-not-dividing-hidden", lambda r: set_key(r, "model.num_heads", 5), "model.num_heads", 5, "divisor"),
    ("hotflip-flips-over-prompt", lambda r: set_key(r, "attack.hotflip.flips", 17), "attack.hotflip.flips", 17,
     "attack.prompt_tokens (16)"),
    ("attack-longer-than-context", lambda r: set_key(r, "attack.continuation_tokens", 120),
     "attack.prompt_tokens", 16, "within eval.context_length"),
    ("hf-data-with-trained-bpe", lambda r: set_key(r, "data.source", "hf"), "tokenizer.source", "train_bpe",
     "'model' when data.source is 'hf'"),
    ("data-revision-with-a-space", lambda r: set_key(r, "data.hf_revision", "main x"), "data.hf_revision", "main x",
     "a hub ref"),
    ("frontier-steps-unordered", lambda r: set_key(r, "frontier.steps", [250, 150]), "frontier.steps", [250, 150],
     "distinct, ascending"),
    ("frontier-step-at-the-end-of-pretraining", lambda r: set_key(r, "frontier.steps", [150, 450]), "frontier.steps",
     [150, 450], "before the end of pretraining"),
    ("validation-interval-beyond-the-budget", lambda r: set_key(r, "train.eval_interval", 81), "train.eval_interval",
     81, "at most train.max_steps (80)"),
    ("harness-task-without-a-cache", lambda r: set_key(r, "benchmarks.tasks", ["pipeline_lastword", "piqa"]),
     "benchmarks.hf_cache_dir", None, "when benchmarks.tasks names a harness task"),
]


def assert_names(exc: P.ParamsError, key: str, value, allowed: str) -> None:
    message = str(exc)
    assert exc.key == key
    assert f"'{key}'" in message
    assert repr(value) in message, f"{value!r} not shown in: {message}"
    assert allowed in exc.allowed and f"allowed: {exc.allowed}" in message


def test_default_params_are_valid():
    assert P.load(PARAMS_YAML).profile == "embedded"


def test_at_least_fifteen_distinct_bad_cases():
    assert len({case[0] for case in BAD_CASES}) == len(BAD_CASES) >= 15


@pytest.mark.parametrize("edit,key,value,allowed", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_params_name_key_value_and_allowed(tmp_path, edit, key, value, allowed):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(edit(base_raw()), sort_keys=False))
    with pytest.raises(P.ParamsError) as info:
        P.load(path)
    assert_names(info.value, key, value, allowed)


@pytest.mark.parametrize("content,value,allowed", [
    (b"data: [unclosed\n", "<unparseable YAML>", "valid YAML"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "<not UTF-8 text>", "UTF-8"),
    (b"just a sentence, not a mapping\n", "just a sentence, not a mapping", "a YAML mapping with keys profile"),
    (b"", None, "a YAML mapping"),
], ids=["broken-yaml", "binary", "scalar", "empty"])
def test_non_yaml_file_is_refused(tmp_path, content, value, allowed):
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(P.ParamsError) as info:
        P.load(path)
    assert_names(info.value, str(path), value, allowed)


def test_missing_file_and_directory_are_refused(tmp_path):
    for path in (tmp_path / "absent.yaml", tmp_path):
        with pytest.raises(P.ParamsError) as info:
            P.load(path)
        assert_names(info.value, str(path), "<missing file>", "params.yaml file")


def test_repeated_key_is_refused_not_silently_overwritten(tmp_path):
    text, inserted = re.subn(r"^(  max_steps: .*\n)", r"\g<1>  lr: 5.0e-1\n", PARAMS_YAML.read_text(), count=1,
                             flags=re.M)
    assert inserted == 1
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(P.ParamsError) as info:
        P.load(path)
    assert_names(info.value, "lr", "<repeated key>", "each key once")


def test_arm_override_is_typed_like_the_section(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string: the override must come back as the float it means
    text = PARAMS_YAML.read_text().replace("  arm_overrides: {}", "  arm_overrides: {monotonic: {lr: 1e-4}}")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = P.load(path)
    assert params.train_for_arm("monotonic").lr == 1e-4
    assert isinstance(params.train_for_arm("monotonic").lr, float)
    assert params.train_for_arm("baseline") == params.train
    assert params.hash() != P.load(PARAMS_YAML).hash()


# --- the CLI refuses before any stage touches outputs ------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_bad_params(ws: Path) -> None:
    (ws / "params.yaml").write_text(
        (ws / "params.yaml").read_text().replace("  lr: 1.0e-3\n", "  lr: -1.0e-3\n", 1))


def test_cli_stage_with_bad_params_exits_2_and_overwrites_nothing(workspace_copy):
    write_bad_params(workspace_copy)
    before = snapshot(workspace_copy)
    assert any(name.startswith("outputs/data/") for name in before)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pipeline", "data"], cwd=workspace_copy, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "'train.lr'" in result.stderr and "-0.001" in result.stderr and "a number > 0" in result.stderr
    assert result.stdout == ""
    assert snapshot(workspace_copy) == before


def test_every_stage_refuses_bad_params_before_writing(workspace_copy, capsys):
    write_bad_params(workspace_copy)
    before = snapshot(workspace_copy)
    for stage, (_, _, per_run) in STAGES.items():
        argv = [stage, "--arm", "baseline", "--seed", "0"] if per_run else [stage]
        if stage == "transfer":
            argv = [stage, "--seed", "0"]
        assert run_stage(workspace_copy, *argv) == 2, stage
        assert "'train.lr'" in capsys.readouterr().err, stage
    assert snapshot(workspace_copy) == before


def test_seed_not_in_params_is_refused(workspace_copy, capsys):
    assert run_stage(workspace_copy, "train", "--arm", "baseline", "--seed", "99") == 2
    assert "--seed 99" in capsys.readouterr().err


# --- profiles --------------------------------------------------------------------------------------

def key_structure(node, prefix=""):
    """Every dotted key path; free-form mappings (arm overrides, pinned revisions) count as one leaf."""
    if not isinstance(node, dict) or prefix == "train.arm_overrides":
        return {prefix}
    return {prefix} | set().union(*(key_structure(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()))


def test_profiles_present_valid_and_named_after_their_file():
    names = {p.stem for p in PROFILE_FILES}
    assert {"embedded", "smoke", "cluster"} <= names
    for path in PROFILE_FILES:
        assert P.load(path).profile == path.stem, path


def test_params_yaml_is_the_embedded_profile_byte_for_byte():
    assert PARAMS_YAML.read_bytes() == (REPO / "profiles" / "embedded.yaml").read_bytes()


def test_params_and_profiles_have_identical_key_structure():
    reference = key_structure(base_raw())
    declared = {f.name for f in dataclasses.fields(P.Params)}
    assert {k.split(".")[0] for k in reference if k} == declared
    for path in PROFILE_FILES:
        assert key_structure(yaml.safe_load(path.read_text())) == reference, path


def test_hf_documents_that_leave_none_for_train_fail_check_params(tmp_path, capsys):
    """The hf source reads exactly data.max_documents: whether train gets any is known from params alone."""
    from pipeline.__main__ import main

    raw = yaml.safe_load((REPO / "profiles" / "cluster.yaml").read_text())
    set_key(set_key(raw, "data.max_documents", 5), "data.fractions",
            fractions(train=0.01, validation=0.96, test=0.01, attack_opt=0.01, attack_eval=0.01))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["check-params", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'data.max_documents'" in err and "5" in err and "leave train at least one document" in err
    set_key(raw, "data.max_documents", 300)       # 288 + 3 x 3 held out: 3 left for train
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["check-params", "--params", str(path)]) == 2    # valid; its hub refs are not in refs.lock.yaml here
    assert f"{path} is valid, but" in capsys.readouterr().err


LADDER = {"cluster-410m": (1024, 24, 16, 4096, 3e-4), "cluster-160m": (768, 12, 12, 3072, 6e-4)}   # Pythia's configs,
LADDER_KEYS = {"profile", "model.hf_name", "model.hf_revision", "model.hf_local_path", "model.hidden_size",   # peak lr
               "model.num_layers", "model.num_heads", "model.intermediate_size", "train.batch_size", "train.grad_accum",
               "train.lr", "train.gradient_checkpointing", "attack.batch_size", "attack.uat.batch_size"}


@pytest.mark.parametrize("name", LADDER)
def test_the_model_size_ladder_differs_from_the_cluster_profile_only_where_the_size_does(name):
    """The same data, token budget, schedule, attacks and seeds as Pythia-1.4B's profile; the model, its sizes, the
    lr scaled as Pythia's peak pretraining lr (1e-5 is 1.4B's 2e-4 / 20), the micro-batch and attack batches."""
    cluster, rung = (yaml.safe_load((REPO / "profiles" / f"{n}.yaml").read_text()) for n in ("cluster", name))
    keys = key_structure(cluster)
    leaves = {k for k in keys if k and not any(j.startswith(k + ".") for j in keys)}
    differ = {k for k in leaves if value_at(cluster, k) != value_at(rung, k)}
    assert differ <= LADDER_KEYS, sorted(differ - LADDER_KEYS)
    hidden, layers, heads, intermediate, peak_lr = LADDER[name]
    m, t = rung["model"], rung["train"]
    assert (m["hidden_size"], m["num_layers"], m["num_heads"], m["intermediate_size"]) == (hidden, layers, heads,
                                                                                           intermediate)
    assert m["hf_name"] == f"EleutherAI/pythia-{name.split('-')[1]}" and m["hf_local_path"] is None
    assert t["batch_size"] * t["grad_accum"] == cluster["train"]["batch_size"] * cluster["train"]["grad_accum"]
    assert float(t["lr"]) == pytest.approx(peak_lr / 20)


REHEARSAL_DEVIATIONS = {"data.hf_dataset", "data.hf_revision", "data.hf_train_files", "model.hf_name",
                        "model.hf_revision", "model.hf_local_path", "frontier.steps", "benchmarks.tasks"}


def value_at(raw: dict, dotted: str):
    for part in dotted.split("."):
        raw = raw[part]
    return raw


def no_larger(small, large) -> bool:
    """A size shrunk or kept: a number <= the other, or a list of numbers no longer and no larger."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(small) and number(large):
        return small <= large
    if isinstance(small, list) and isinstance(large, list) and all(map(number, small + large)):
        return len(small) <= len(large) and max(small, default=0) <= max(large, default=0)
    return False


def test_rehearsal_is_the_cluster_profile_with_only_sizes_shrunk():
    """Any other difference is one of REHEARSAL_DEVIATIONS, each explained in the profile's header comment."""
    cluster, rehearsal = (yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text())
                          for name in ("cluster", "rehearsal"))
    keys = key_structure(cluster) - {"", "profile"}
    leaves = {k for k in keys if not any(other.startswith(k + ".") for other in keys)}
    for key in sorted(leaves - REHEARSAL_DEVIATIONS):
        small, large = value_at(rehearsal, key), value_at(cluster, key)
        assert small == large or no_larger(small, large), \
            f"{key}: rehearsal {small!r}, cluster {large!r}: not a size shrunk; align it or document it"
    text = (REPO / "profiles" / "rehearsal.yaml").read_text()
    header = text[:text.index("\nprofile:")]
    for key in REHEARSAL_DEVIATIONS:
        assert key in header, f"{key} differs from the cluster profile without a reason in the header"


def test_profile_switch_round_trip(tmp_path, capsys):
    from pipeline.__main__ import main

    target = tmp_path / "params.yaml"
    target.write_bytes(PARAMS_YAML.read_bytes())
    assert main(["profile", "cluster", "--params", str(target)]) == 0
    assert target.read_bytes() == (REPO / "profiles" / "cluster.yaml").read_bytes()
    assert P.load(target).profile == "cluster"
    assert main(["profile", "embedded", "--params", str(target)]) == 0
    assert target.read_bytes() == PARAMS_YAML.read_bytes()

    assert main(["profile", "laptop", "--params", str(target)]) == 2
    err = capsys.readouterr().err
    assert "'profile'" in err and "'laptop'" in err and "cluster" in err
    assert target.read_bytes() == PARAMS_YAML.read_bytes()


def test_profile_switch_refuses_an_invalid_profile(tmp_path, monkeypatch, capsys):
    from pipeline.__main__ import main

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken.yaml").write_text(yaml.safe_dump(set_key(base_raw(), "train.warmup_ratio", 1.5)))
    (profiles / "misnamed.yaml").write_text(PARAMS_YAML.read_text())   # says profile: embedded
    monkeypatch.setattr(P, "PROFILES_DIR", profiles)
    target = tmp_path / "params.yaml"
    target.write_bytes(PARAMS_YAML.read_bytes())
    assert main(["profile", "broken", "--params", str(target)]) == 2
    assert "'train.warmup_ratio'" in capsys.readouterr().err
    assert main(["profile", "misnamed", "--params", str(target)]) == 2
    assert "'embedded'" in capsys.readouterr().err
    assert target.read_bytes() == PARAMS_YAML.read_bytes()


def test_params_are_immutable_and_hash_is_stable():
    params = P.load(PARAMS_YAML)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0
    assert params.hash() == P.load(PARAMS_YAML).hash() == P.validate(copy.deepcopy(base_raw())).hash()
    assert params.hash() != P.load(REPO / "profiles" / "smoke.yaml").hash()


@pytest.mark.parametrize("key, value, allowed", [
    ("seeds", [0, 2 ** 32], "[0, 2**32)"),
    ("pretrain.seed", 2 ** 32, "[0, 2**32)"),
    ("data.split_seed", 2 ** 40, "[0, 2**32)"),
    ("attack.hotflip.topk", 2048, "fewer than tokenizer.vocab_size (2048)"),
    ("attack.uat.topk", 5000, "fewer than tokenizer.vocab_size (2048)"),
])
def test_seeds_numpy_cannot_take_and_pools_beyond_the_vocabulary_fail_validation(key, value, allowed):
    """Before: the first stage that seeds crashed in np.random.seed; a top-k beyond the vocabulary in topk()."""
    raw = set_key(base_raw(), key, value)
    with pytest.raises(P.ParamsError) as exc:
        P.validate(raw)
    assert exc.value.key == key and allowed in exc.value.allowed
