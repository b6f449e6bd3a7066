"""Hub refs and the HF hub cache. `python -m pipeline fetch` resolves every ref the params name into refs.lock.yaml
(tested against tests/rehearsal.py's fake hub: nothing here can reach the network) and stores what the stages
read; stages read commits only from refs.lock.yaml, find files only under their commit, verified against their blob
names, and a missing or damaged one, or a ref without an entry, stops them before any compute naming `fetch`."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

import rehearsal
from rehearsal import rehearsal_fetched, rehearsal_hub, scratch  # noqa: F401 (fixtures)
from conftest import REPO, run_stage
from pipeline import data as D, hub, params as P, refs
from pipeline.__main__ import main

CLUSTER = REPO / "profiles" / "cluster.yaml"


@pytest.fixture
def rehearsal_params():
    return P.load(rehearsal.REHEARSAL_PARAMS)


def commit(section: str, key: str | None = None) -> str:
    """refs.lock.yaml's commit (of the working directory's lock: the scratch fixture's)."""
    lock = refs.read()
    return (lock[section] if key is None else lock[section][key])["commit"]


def workspace(tmp_path: Path, params_file: Path = rehearsal.REHEARSAL_PARAMS) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(params_file, ws / "params.yaml")
    if refs.LOCK_FILE.exists():
        shutil.copy(refs.LOCK_FILE, ws / "refs.lock.yaml")
    return ws


def tamper(link: Path) -> Path:
    blob = link.resolve()
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 1
    blob.write_bytes(bytes(content))
    return blob


# --- params and refs.lock.yaml --------------------------------------------------------------------------

def test_cluster_profile_is_valid_and_check_params_names_fetch_for_every_unresolved_ref(tmp_path, monkeypatch,
                                                                                        capsys):
    """The cluster names Pythia's step branches and the paper's tasks by name; with no refs.lock.yaml entry for them,
    check-params exits 2 listing each ref and the fetch command (here, where the hub cannot be reached)."""
    cluster = P.load(CLUSTER)
    assert [s for s in cluster.frontier.steps] == [1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000]
    assert cluster.benchmarks.tasks[1:] == ["lambada_openai", "piqa", "winogrande", "wsc", "arc_easy",
                                            "arc_challenge", "sciq", "logiqa"]
    monkeypatch.chdir(tmp_path)
    assert main(["check-params", "--params", str(CLUSTER)]) == 2
    err = capsys.readouterr().err
    assert "model EleutherAI/pythia-1.4b@step128000 (frontier.steps 128000)" in err
    assert "the dataset of lm-eval task logiqa@main (benchmarks.tasks logiqa)" in err
    assert "run `python -m pipeline fetch`" in err
    assert main(["check-params", "--params", str(REPO / "params.yaml")]) == 0     # the embedded default: no refs
    assert "0 hub refs resolved" in capsys.readouterr().out


@pytest.mark.parametrize("key, value, allowed", [
    ("data.hf_revision", "", "a hub ref"),
    ("model.hf_revision", "v1 .0", "a hub ref"),
    ("data.hf_train_files", [], "non-empty"),
    ("data.hf_train_files", ["train/00.parquet"], ".jsonl.zst"),
    ("data.hf_train_files", ["/abs/00.jsonl.zst"], "relative"),
    ("data.hf_train_files", ["../00.jsonl.zst"], "relative"),
    ("data.hf_heldout_files", ["val.jsonl.zst", "val.jsonl.zst"], "distinct"),
    ("data.hf_heldout_files", ["train/00.jsonl.zst", "test.jsonl.zst"], "disjoint from data.hf_train_files"),
    ("data.max_documents", 0, "at least one document when data.source is 'hf'"),
    ("benchmarks.hf_cache_dir", None, "when benchmarks.tasks names a harness task"),
])
def test_hub_keys_are_validated(key, value, allowed):
    raw = yaml.safe_load(CLUSTER.read_text())
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(P.ParamsError) as exc:
        P.validate(raw)
    assert exc.value.key == key and allowed in exc.value.allowed and repr(value) in str(exc.value)


@pytest.mark.slow   # three fetches, each loading the toy piqa offline in a subprocess
def test_fetch_resolves_refs_into_the_lock_once_and_update_moves_them(rehearsal_hub, tmp_path, monkeypatch, capsys):
    """Branches resolve to their commits with every file's size and sha256; check-params then passes. When a
    branch moves on the hub, fetch keeps the locked commit (and says nothing moved); --update moves it."""
    hub_copy = rehearsal.copy_cache(rehearsal_hub, tmp_path / "hub")
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    ws = workspace(tmp_path)
    assert rehearsal.fetch(ws, hub_copy) == 0
    lock = refs.read(ws / "refs.lock.yaml")
    assert lock["data"]["commit"] == rehearsal.COMMITS["data"] and lock["data"]["ref"] == "main"
    assert lock["model"]["commit"] == rehearsal.COMMITS["model"]
    assert lock["frontier"]["step1000"]["commit"] == rehearsal.step_commit(1000)
    assert lock["tasks"]["piqa"]["repo"] == rehearsal.PIQA and lock["tasks"]["piqa"]["splits"] == rehearsal.PIQA_ROWS
    weights = lock["frontier"]["step1000"]["files"]["model.safetensors"]
    blob = (tmp_path / "scratch/hf/hub/models--rehearsal--pythia-toy/snapshots" / rehearsal.step_commit(1000)
            / "model.safetensors").resolve()
    assert weights == {"size": blob.stat().st_size, "sha256": blob.name}
    assert set(lock["data"]["files"]) == {"train/00.jsonl.zst", "train/01.jsonl.zst", "train/02.jsonl.zst",
                                          "val.jsonl.zst", "test.jsonl.zst"}
    assert run_stage(ws, "check-params") == 0

    data_repo = hub.Repo("dataset", "rehearsal/pile-uncopyrighted-embedded", rehearsal.COMMITS["data"], hub_copy)
    add_other_commit(data_repo, "0" * 40)                 # the hub's main moves on
    before = (ws / "refs.lock.yaml").read_text()
    assert rehearsal.fetch(ws, hub_copy) == 0
    assert (ws / "refs.lock.yaml").read_text() == before and "moves" not in capsys.readouterr().out
    assert rehearsal.fetch(ws, hub_copy, update=True) == 0
    assert f"moves dataset rehearsal/pile-uncopyrighted-embedded@main (data.hf_revision) from " \
           f"{rehearsal.COMMITS['data']} to {'0' * 40}" in capsys.readouterr().out
    assert refs.read(ws / "refs.lock.yaml")["data"]["commit"] == "0" * 40


def test_a_ref_without_a_lock_entry_stops_the_stage_before_compute_naming_fetch(scratch, tmp_path, capsys):
    ws = workspace(tmp_path)
    lock = refs.read(ws / "refs.lock.yaml")
    del lock["frontier"]["step1000"]
    refs.write(lock, ws / "refs.lock.yaml")
    assert run_stage(ws, "check-params") == 2
    assert "rehearsal/pythia-toy@step1000 (frontier.steps 1000)" in capsys.readouterr().err
    assert run_stage(ws, "data") == 0
    assert run_stage(ws, "pretrain") == 2
    err = capsys.readouterr().err
    assert "refs.lock.yaml has no commit for model rehearsal/pythia-toy@step1000" in err and "pipeline fetch" in err
    assert not (ws / "outputs/models").exists()


def test_a_frontier_branch_without_weights_or_with_another_branchs_weights_is_refused(rehearsal_hub, tmp_path,
                                                                                     monkeypatch, capsys):
    """Pythia issue 205: step branches bit-identical to main. And config.json alone is no checkpoint."""
    hub_copy = rehearsal.copy_cache(rehearsal_hub, tmp_path / "hub")
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    ws = workspace(tmp_path)
    step = hub.Repo("model", "rehearsal/pythia-toy", rehearsal.step_commit(1000), hub_copy)
    main_weights = hub.Repo("model", "rehearsal/pythia-toy", rehearsal.COMMITS["model"], hub_copy).snapshot
    (step.snapshot / "model.safetensors").unlink()
    assert rehearsal.fetch(ws, hub_copy) == 1
    assert "no *.safetensors weights" in capsys.readouterr().err
    rehearsal.add_file(step, "model.safetensors", (main_weights / "model.safetensors").read_bytes(), "step1000")
    assert rehearsal.fetch(ws, hub_copy) == 1
    err = capsys.readouterr().err
    assert "step1000 (rehearsal/pythia-toy@step1000" in err and "same weights as model" in err and "205" in err


def test_a_task_dataset_that_needs_a_loading_script_is_refused(rehearsal_hub, tmp_path, monkeypatch, capsys):
    hub_copy = rehearsal.copy_cache(rehearsal_hub, tmp_path / "hub")
    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    ws = workspace(tmp_path)
    piqa = hub.Repo("dataset", rehearsal.PIQA, rehearsal.COMMITS["piqa"], hub_copy)
    rehearsal.add_file(piqa, "piqa.py", b"import datasets\n")
    assert rehearsal.fetch(ws, hub_copy) == 1
    err = capsys.readouterr().err
    assert "defined by a loading script (piqa.py)" in err and "trust_remote_code" in err
    assert refs.read(ws / "refs.lock.yaml")["tasks"] == {}        # nothing written after a failure


# --- the cache, offline ----------------------------------------------------------------------------

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
    model_dir = hub.model_dir(rehearsal_params.model, commit("model"))
    assert model_dir == scratch / "hf/hub/models--rehearsal--pythia-toy/snapshots" / rehearsal.COMMITS["model"]
    from pipeline.models import load_causal_lm

    model = load_causal_lm(model_dir)
    tokenizer = D.load_tokenizer(model_dir)
    assert model.config.vocab_size == rehearsal.padded_rows(len(tokenizer)) > len(tokenizer)   # Pythia's rule
    assert model.config.use_parallel_residual and not model.config.tie_word_embeddings
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.25
    files = hub.data_files(rehearsal_params.data, commit("data"))
    assert list(files) == [*rehearsal_params.data.hf_train_files, *rehearsal_params.data.hf_heldout_files]
    for name, (path, digest) in files.items():
        assert path.resolve().name == digest == hub.content_hash(path, "lfs"), name


def add_other_commit(repo: hub.Repo, other: str) -> hub.Repo:
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


def test_the_locked_commit_is_read_when_the_branch_moves_in_the_cache(scratch, rehearsal_params):
    """refs/main moved to another commit: data files (named) and the model snapshot (no data files) are
    still read at refs.lock.yaml's commits."""
    other = "0" * 40
    data_repo = hub.dataset_repo(rehearsal_params.data, commit("data"))
    model_repo = hub.model_repo(rehearsal_params.model, commit("model"))
    add_other_commit(data_repo, other)
    add_other_commit(model_repo, other)
    files = hub.data_files(rehearsal_params.data, commit("data"))
    splits = D.load_splits(rehearsal_params.data, {n: p for n, (p, _) in files.items()})
    assert not any("moved on" in d.text for docs in splits.values() for d in docs)
    assert all(f"/snapshots/{rehearsal.COMMITS['data']}/" in str(p) for p, _ in files.values())
    model_dir = hub.model_dir(rehearsal_params.model, commit("model"))
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((hub.model_dir(rehearsal_params.model, other, weights=False) / "config.json").read_text()
                      )["num_hidden_layers"] == 1


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
    data_snapshot = hub.dataset_repo(rehearsal_params.data, commit("data")).snapshot
    model_snapshot = hub.model_repo(rehearsal_params.model, commit("model")).snapshot
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
    link = hub.model_repo(rehearsal_params.model, commit("model")).snapshot / "tokenizer.json"
    content = link.read_bytes()
    link.unlink()
    link.write_bytes(content)
    with pytest.raises(hub.CorruptInCache, match="not a link into the repository's blobs"):
        hub.model_dir(rehearsal_params.model, commit("model"), weights=False)


def test_explicit_local_path_wins_and_a_baked_snapshot_must_be_the_locked_commit(scratch, rehearsal_params,
                                                                                 tmp_path):
    snapshot = hub.model_repo(rehearsal_params.model, commit("model")).snapshot
    baked = tmp_path / "opt" / "models" / "toy"
    baked.parent.mkdir(parents=True)
    baked.symlink_to(snapshot)                           # as the image links /opt/models/pythia-1.4b
    m = dataclasses.replace(rehearsal_params.model, hf_local_path=str(baked), hf_cache_dir="/nonexistent")
    assert hub.model_dir(m, commit("model")) == snapshot
    with pytest.raises(hub.HubCacheError, match="at commit a1b2.*but refs.lock.yaml pins .* at 1111"):
        hub.model_dir(m, "1" * 40)
    tamper(snapshot / "model.safetensors")
    with pytest.raises(hub.CorruptInCache):
        hub.model_dir(m, commit("model"))
    plain = tmp_path / "plain"
    shutil.copytree(snapshot, plain)                     # follows the links: an ordinary directory
    assert hub.model_dir(dataclasses.replace(m, hf_local_path=str(plain)), commit("model")) == plain
    with pytest.raises(hub.MissingFromCache, match="holds no checkpoint.*python -m pipeline fetch"):
        hub.model_dir(dataclasses.replace(m, hf_local_path=str(tmp_path / "absent")), commit("model"))


# --- fetch, offline -------------------------------------------------------------------------------

def test_fetch_offline_verifies_against_the_lock_and_prints_what_is_stored(scratch, rehearsal_params, capsys):
    before = refs.LOCK_FILE.read_text()
    assert main(["fetch", "--params", str(rehearsal.REHEARSAL_PARAMS)]) == 0
    out = capsys.readouterr().out
    assert "HF_HUB_OFFLINE is set" in out and refs.LOCK_FILE.read_text() == before     # nothing resolved or written
    for repo, names in ((hub.dataset_repo(rehearsal_params.data, commit("data")),
                         [*rehearsal_params.data.hf_train_files, *rehearsal_params.data.hf_heldout_files]),
                        (hub.model_repo(rehearsal_params.model, commit("model")),
                         hub.snapshot_files(hub.model_repo(rehearsal_params.model, commit("model"))))):
        assert f"{len(names)} files verified in {repo.snapshot}" in out
        for name in names:
            assert f"{name} " in out
    assert "train/03.jsonl.zst" not in out          # only what the profile names


def test_fetch_offline_reports_missing_and_damaged_files(scratch, rehearsal_params, capsys):
    link = hub.dataset_repo(rehearsal_params.data, commit("data")).snapshot / "test.jsonl.zst"
    blob = tamper(link)
    assert main(["fetch", "--params", str(rehearsal.REHEARSAL_PARAMS)]) == 1
    assert str(blob) in capsys.readouterr().err
    link.unlink()
    assert main(["fetch", "--params", str(rehearsal.REHEARSAL_PARAMS)]) == 1
    assert str(link) in capsys.readouterr().err


@pytest.mark.slow   # lm-eval's task index takes ~15 s to build
def test_fetch_needs_exactly_what_the_profile_reads(monkeypatch, tmp_path):
    from pipeline import fetch

    monkeypatch.setenv("SCRATCH", str(tmp_path))
    cluster = P.load(CLUSTER)
    got = [(n.ref.section, n.repo_id, n.ref.ref, n.files, n.patterns, n.weights) for n in fetch.needs(cluster)]
    assert got[0] == ("data", "monology/pile-uncopyrighted", "3be90335b66f24456a5d6659d9c8d208c0357119",
                      ("train/00.jsonl.zst", "val.jsonl.zst", "test.jsonl.zst"), (), False)
    assert got[1] == ("model", "EleutherAI/pythia-1.4b", "fedc38a16eea3bd36a96b906d78d11d2ce18ed79", (), (),
                      False)                            # baked into the image: resolved, not downloaded
    assert [g[2] for g in got if g[0] == "frontier"] == [f"step{s}" for s in cluster.frontier.steps]
    assert all(g[4] == fetch.MODEL_PATTERNS and "*.bin" not in g[4] and g[5] for g in got if g[0] == "frontier")
    tasks = {g[2 - 1]: g for g in got if g[0] == "tasks"}
    assert set(tasks) == {"EleutherAI/lambada_openai", "baber/piqa", "allenai/winogrande", "aps/super_glue",
                          "allenai/ai2_arc", "allenai/sciq", "EleutherAI/logiqa"}   # arc_easy, arc_challenge: one repo
    assert fetch.needs(cluster)[0].cache_dir == tmp_path / "hf" / "hub"
    assert [n.cache_dir for n in fetch.needs(cluster) if n.ref.section == "tasks"][0] == tmp_path / "hf/tasks/hub"
    assert fetch.needs(P.load(REPO / "params.yaml")) == []
    from pipeline import benchmarks as B                 # the text scan finds what the harness's own index does

    manager = B.task_manager(cluster.benchmarks.tasks, None)
    for task in cluster.benchmarks.tasks[1:]:
        assert B.harness_task_config(task) == B.task_config(task, manager), task
