"""The HF hub cache, offline: pinned files are found only under their commit, verified against their blob
names, and a missing or damaged one stops a stage before any compute with the path and the `fetch` command.
`python -m pipeline fetch` is tested on its offline paths (nothing here can reach the network)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

import rehearsal
from rehearsal import rehearsal_cache, scratch  # noqa: F401 (fixtures)
from conftest import REPO, run_stage
from pipeline import data as D, hub, params as P
from pipeline.__main__ import main

CLUSTER = REPO / "profiles" / "cluster.yaml"


@pytest.fixture
def rehearsal_params():
    return P.load(rehearsal.REHEARSAL_PARAMS)


def workspace(tmp_path: Path, params_file: Path = rehearsal.REHEARSAL_PARAMS) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(params_file, ws / "params.yaml")
    return ws


def tamper(link: Path) -> Path:
    blob = link.resolve()
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 1
    blob.write_bytes(bytes(content))
    return blob


# --- params ----------------------------------------------------------------------------------------

def test_cluster_profile_is_accepted_and_pins_every_revision(capsys):
    assert main(["check-params", "--params", str(CLUSTER)]) == 0
    assert "valid (profile cluster" in capsys.readouterr().out
    raw = yaml.safe_load(CLUSTER.read_text())
    revisions = [raw["data"]["hf_revision"], raw["model"]["hf_revision"]]
    assert revisions == ["3be90335b66f24456a5d6659d9c8d208c0357119", "fedc38a16eea3bd36a96b906d78d11d2ce18ed79"]
    for path in sorted((REPO / "profiles").glob("*.yaml")):
        for section in ("data", "model"):
            assert P.COMMIT_RE.fullmatch(yaml.safe_load(path.read_text())[section]["hf_revision"]), (path, section)


@pytest.mark.parametrize("key, value, allowed", [
    ("data.hf_revision", "main", "40-hex-digit commit"),
    ("model.hf_revision", "v1.0", "40-hex-digit commit"),
    ("model.hf_revision", "FEDC38A16EEA3BD36A96B906D78D11D2CE18ED79", "40-hex-digit commit"),
    ("data.hf_train_files", [], "non-empty"),
    ("data.hf_train_files", ["train/00.parquet"], ".jsonl.zst"),
    ("data.hf_train_files", ["/abs/00.jsonl.zst"], "relative"),
    ("data.hf_train_files", ["../00.jsonl.zst"], "relative"),
    ("data.hf_heldout_files", ["val.jsonl.zst", "val.jsonl.zst"], "distinct"),
    ("data.hf_heldout_files", ["train/00.jsonl.zst", "test.jsonl.zst"], "disjoint from data.hf_train_files"),
    ("data.max_documents", 0, "at least one document when data.source is 'hf'"),
])
def test_hub_keys_are_validated(key, value, allowed):
    raw = yaml.safe_load(CLUSTER.read_text())
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(P.ParamsError) as exc:
        P.validate(raw)
    assert exc.value.key == key and allowed in exc.value.allowed and repr(value) in str(exc.value)


# --- resolution and verification -------------------------------------------------------------------

def test_cache_dir_expands_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCH", str(tmp_path))
    assert hub.cache_dir("$SCRATCH/hf/hub", "data.hf_cache_dir") == tmp_path / "hf" / "hub"
    monkeypatch.delenv("SCRATCH")
    with pytest.raises(hub.HubCacheError, match=r"data.hf_cache_dir '\$SCRATCH/hf/hub'.*not set"):
        hub.cache_dir("$SCRATCH/hf/hub", "data.hf_cache_dir")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hub.cache_dir(None, "model.hf_cache_dir") == tmp_path / "elsewhere"


def test_populated_cache_loads_with_the_network_off(scratch, rehearsal_params, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model_dir = hub.model_dir(rehearsal_params.model)
    assert model_dir == scratch / "hf/hub/models--rehearsal--pythia-toy/snapshots" / rehearsal_params.model.hf_revision
    from pipeline.models import load_causal_lm

    model = load_causal_lm(model_dir)
    tokenizer = D.load_tokenizer(model_dir)
    assert model.config.vocab_size == rehearsal.padded_rows(len(tokenizer)) > len(tokenizer)   # Pythia's rule
    assert model.config.use_parallel_residual and not model.config.tie_word_embeddings
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25
    files = hub.data_files(rehearsal_params.data)
    assert list(files) == [*rehearsal_params.data.hf_train_files, *rehearsal_params.data.hf_heldout_files]
    for name, (path, digest) in files.items():
        assert path.resolve().name == digest == hub.content_hash(path, "lfs"), name


def add_other_commit(cache: Path, repo: hub.Repo, other: str) -> hub.Repo:
    """The same repository at another commit, with other content, which refs/main names."""
    moved = dataclasses.replace(repo, revision=other)
    for name in hub.snapshot_files(repo):
        content = (repo.snapshot / name).read_bytes()
        if name.endswith(".zst"):
            content = rehearsal.jsonl_zst([D.Document("x", "x", "moved on " * 40)])
        elif name == "config.json":
            content = json.dumps({**json.loads(content), "num_hidden_layers": 1}).encode()
        rehearsal.add_file(moved, name, content)
    assert (repo.folder / "refs" / "main").read_text() == other
    return moved


def test_the_pinned_commit_is_used_with_and_without_data_files(scratch, rehearsal_params):
    """refs/main moved to another commit: data files (named) and the model snapshot (no data files) are
    still read at the pinned commits."""
    other = "0" * 40
    data_repo, model_repo = hub.dataset_repo(rehearsal_params.data), hub.model_repo(rehearsal_params.model)
    add_other_commit(scratch, data_repo, other)
    add_other_commit(scratch, model_repo, other)
    splits = D.load_splits(rehearsal_params.data,
                           {n: p for n, (p, _) in hub.data_files(rehearsal_params.data).items()})
    assert not any("moved on" in d.text for docs in splits.values() for d in docs)
    assert all(f"/snapshots/{rehearsal_params.data.hf_revision}/" in str(p)
               for p, _ in hub.data_files(rehearsal_params.data).values())
    model_dir = hub.model_dir(rehearsal_params.model)
    assert model_dir.name == rehearsal_params.model.hf_revision
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 2
    moved = dataclasses.replace(rehearsal_params.model, hf_revision=other)
    assert json.loads((hub.model_dir(moved) / "config.json").read_text())["num_hidden_layers"] == 1


def test_missing_files_fail_before_any_compute_with_the_fetch_command(scratch, tmp_path, capsys):
    ws = workspace(tmp_path)
    shard = scratch / "hf/hub/datasets--rehearsal--pile-uncopyrighted-embedded/snapshots"
    link = next(shard.glob("*/val.jsonl.zst"))
    link.unlink()
    assert run_stage(ws, "data") == 2
    err = capsys.readouterr().err
    assert "'val.jsonl.zst' is not in the HF hub cache" in err and str(link) in err
    assert "python -m pipeline fetch" in err
    assert not (ws / "outputs").exists()

    shutil.rmtree(scratch / "hf/hub/models--rehearsal--pythia-toy")
    assert run_stage(ws, "pretrain") == 2
    err = capsys.readouterr().err
    assert "'config.json' is not in the HF hub cache" in err and "models--rehearsal--pythia-toy/snapshots/" in err
    assert "python -m pipeline fetch" in err and not (ws / "outputs").exists()


@pytest.mark.parametrize("target", ["dataset", "model-weights", "model-config"])
def test_a_file_whose_hash_differs_is_refused(scratch, rehearsal_params, tmp_path, capsys, target):
    data_snapshot = hub.dataset_repo(rehearsal_params.data).snapshot
    model_snapshot = hub.model_repo(rehearsal_params.model).snapshot
    link = {"dataset": data_snapshot / "train/01.jsonl.zst", "model-weights": model_snapshot / "model.safetensors",
            "model-config": model_snapshot / "config.json"}[target]
    blob = tamper(link)
    with pytest.raises(hub.CorruptInCache, match="hashes to"):
        hub.verify(link)
    ws = workspace(tmp_path)
    stage = "pretrain" if target == "model-weights" else "data"   # the data stage reads no weights
    assert run_stage(ws, stage) == 2
    err = capsys.readouterr().err
    assert "refused" in err and str(blob) in err and "python -m pipeline fetch" in err
    assert not (ws / "outputs").exists()


def test_a_plain_file_in_a_snapshot_cannot_be_verified(scratch, rehearsal_params):
    link = hub.model_repo(rehearsal_params.model).snapshot / "tokenizer.json"
    content = link.read_bytes()
    link.unlink()
    link.write_bytes(content)
    with pytest.raises(hub.CorruptInCache, match="not a link into the repository's blobs"):
        hub.model_dir(rehearsal_params.model, weights=False)


def test_explicit_local_path_wins_and_a_baked_snapshot_must_be_the_pinned_commit(scratch, rehearsal_params,
                                                                                 tmp_path):
    snapshot = hub.model_repo(rehearsal_params.model).snapshot
    baked = tmp_path / "opt" / "models" / "toy"
    baked.parent.mkdir(parents=True)
    baked.symlink_to(snapshot)                           # as the image links /opt/models/pythia-1.4b
    m = dataclasses.replace(rehearsal_params.model, hf_local_path=str(baked), hf_cache_dir="/nonexistent")
    assert hub.model_dir(m) == snapshot
    with pytest.raises(hub.HubCacheError, match="at commit a1b2.*but params pin .* at 1111"):
        hub.model_dir(dataclasses.replace(m, hf_revision="1" * 40))
    tamper(snapshot / "model.safetensors")
    with pytest.raises(hub.CorruptInCache):
        hub.model_dir(m)
    plain = tmp_path / "plain"
    shutil.copytree(snapshot, plain)                     # follows the links: an ordinary directory
    assert hub.model_dir(dataclasses.replace(m, hf_local_path=str(plain))) == plain
    with pytest.raises(hub.MissingFromCache, match="holds no checkpoint.*python -m pipeline fetch"):
        hub.model_dir(dataclasses.replace(m, hf_local_path=str(tmp_path / "absent")))


# --- fetch, offline -------------------------------------------------------------------------------

def test_fetch_offline_verifies_and_prints_what_is_stored(scratch, rehearsal_params, capsys):
    assert main(["fetch", "--params", str(rehearsal.REHEARSAL_PARAMS)]) == 0
    out = capsys.readouterr().out
    assert "HF_HUB_OFFLINE is set" in out
    for repo, names in ((hub.dataset_repo(rehearsal_params.data),
                         [*rehearsal_params.data.hf_train_files, *rehearsal_params.data.hf_heldout_files]),
                        (hub.model_repo(rehearsal_params.model), hub.snapshot_files(hub.model_repo(rehearsal_params.model)))):
        assert f"{len(names)} files verified in {repo.snapshot}" in out
        for name in names:
            assert f"{name} " in out and (repo.snapshot / name).resolve().name in out
    assert "train/03.jsonl.zst" not in out          # only what the profile names


def test_fetch_offline_reports_missing_and_damaged_files(scratch, rehearsal_params, capsys):
    link = hub.dataset_repo(rehearsal_params.data).snapshot / "test.jsonl.zst"
    blob = tamper(link)
    assert main(["fetch", "--params", str(rehearsal.REHEARSAL_PARAMS)]) == 1
    assert str(blob) in capsys.readouterr().err
    link.unlink()
    assert main(["fetch", "--params", str(rehearsal.REHEARSAL_PARAMS)]) == 1
    err = capsys.readouterr().err
    assert str(link) in err and "HF_HUB_OFFLINE=1" in err


def test_fetch_needs_exactly_what_the_profile_reads(monkeypatch, tmp_path):
    from pipeline import fetch

    monkeypatch.setenv("SCRATCH", str(tmp_path))
    cluster = P.load(CLUSTER)
    assert [(n.repo.repo_type, n.repo.repo_id, n.repo.revision, n.files) for n in fetch.needs(cluster)] == [
        ("dataset", "monology/pile-uncopyrighted", "3be90335b66f24456a5d6659d9c8d208c0357119",
         ("train/00.jsonl.zst", "val.jsonl.zst", "test.jsonl.zst"))]      # the model is baked into the image
    assert fetch.needs(cluster)[0].repo.cache_dir == tmp_path / "hf" / "hub"
    weightless = dataclasses.replace(cluster, model=dataclasses.replace(cluster.model, hf_local_path=None))
    model_need = fetch.needs(weightless)[0]
    assert (model_need.repo.repo_id, model_need.repo.revision) == ("EleutherAI/pythia-1.4b",
                                                                   "fedc38a16eea3bd36a96b906d78d11d2ce18ed79")
    assert "*.safetensors" in model_need.patterns and "*.bin" not in model_need.patterns
    assert fetch.needs(P.load(REPO / "params.yaml")) == []
    rehearsal = P.load(REPO / "profiles" / "rehearsal.yaml")     # the frontier's intermediate checkpoints too
    models = [(n.repo.repo_id, n.repo.revision) for n in fetch.needs(rehearsal) if n.repo.repo_type == "model"]
    assert models == [(rehearsal.model.hf_name, rehearsal.model.hf_revision),
                      *((rehearsal.model.hf_name, c) for c in rehearsal.frontier.hf_revisions.values())]


@pytest.mark.slow   # lm-eval's task registry takes ~15 s to build
def test_fetch_covers_pinned_benchmark_datasets(tmp_path, monkeypatch, capsys):
    """A harness task's dataset (piqa -> baber/piqa) at its pinned commit, in the default hub cache where the
    benchmarks stage looks: missing -> an error naming the snapshot; present and intact -> verified."""
    from huggingface_hub import constants

    revision = "2e8ac2dffd59bac8c3c6714948f4c551a0848bb0"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["benchmarks"].update(tasks=["pipeline_lastword", "piqa"], dataset_revisions={"piqa": revision})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    assert main(["fetch", "--params", str(params_file)]) == 1
    snapshot = tmp_path / "hub" / "datasets--baber--piqa" / "snapshots" / revision
    assert str(snapshot) in capsys.readouterr().err
    repo = hub.Repo("dataset", "baber/piqa", revision, tmp_path / "hub")
    rehearsal.add_file(repo, "data/train-00000.parquet", b"not really parquet")
    rehearsal.add_file(repo, "README.md", b"# piqa\n")
    assert main(["fetch", "--params", str(params_file)]) == 0
    out = capsys.readouterr().out
    assert f"2 files verified in {snapshot}" in out and "data/train-00000.parquet" in out
