"""The Apptainer definition (Apptainer itself cannot run here): it parses into the expected sections
(spython), its base reference obeys the docker reference grammar as containers/image reads it, its
scriptlets parse under the interpreter Apptainer would use, its pins agree with requirements.lock and the
params profiles, and the %test smoke check runs against this checkout. The slow `container` tests rehearse
the build for real (container/rehearse.py: a Debian root standing in for the PyTorch image, %post under
dash, %test, pip check) and run pipeline commands inside the result as `apptainer exec` would."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import pipeline_env, smoke_checkout

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "container"))
import rehearse  # noqa: E402
sys.path.pop(0)

DEFINITION = REPO / "container" / "pipeline.def"
LOCK = REPO / "requirements.lock"


def sections(text: str) -> dict[str, str]:
    """%name -> body, for the definition's sections (the header is under '')."""
    out, name = {"": []}, ""
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            name = match.group(1)
            out[name] = []
        else:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def build_arguments(text: str) -> dict[str, str]:
    return dict(line.strip().split("=", 1) for line in sections(text)["arguments"].splitlines()
                if "=" in line and not line.strip().startswith("#"))


def render(text: str, arguments: dict[str, str]) -> str:
    """Apptainer's {{ VAR }} build-argument substitution."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: arguments[m.group(1)], text)


def lock_pins() -> dict[str, str]:
    return dict(line.split("==", 1) for line in LOCK.read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def labels(text: str) -> dict[str, str]:
    return dict(line.strip().split(None, 1) for line in sections(text)["labels"].splitlines() if line.strip())


@pytest.fixture(scope="module")
def definition() -> str:
    return DEFINITION.read_text()


def test_definition_parses_into_every_section(definition):
    spython = pytest.importorskip("spython.main.parse.parsers", reason="spython (test dependency) not installed")
    recipe = next(iter(spython.SingularityParser(str(DEFINITION)).recipe.values()))
    assert re.fullmatch(r"pytorch/pytorch@sha256:[0-9a-f]{64}", recipe.fromHeader), recipe.fromHeader
    assert recipe.files == ["src /opt/src"]
    environ = dict(line.split("=", 1) for line in recipe.environ if "=" in line)
    assert environ["HF_HUB_OFFLINE"] == "1" and environ["HF_DATASETS_OFFLINE"] == "1"
    assert environ["HF_HUB_CACHE"] == "/opt/hf/hub"
    for writable in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        assert "/scratch/" in environ[writable], writable
    assert recipe.cmd == 'exec python -m pipeline "$@"'
    assert recipe.install and recipe.labels and recipe.test
    header = sections(definition)[""]
    assert re.search(r"^Bootstrap: docker$", header, re.M)


def test_jobs_point_every_writable_cache_of_the_image_into_scratch_without_a_nested_bind(definition):
    """Each variable %environment defaults to a /scratch path, stage.sbatch exports as a $SCRATCH path and
    passes through --cleanenv; $SCRATCH is bound at its own path only (a bind of $SCRATCH at /scratch as well
    would cover /scratch/$USER where runtimes mount in command-line order)."""
    sbatch = (REPO / "slurm" / "stage.sbatch").read_text()
    writable = re.findall(r"export (\w+)=\$\{\1:-/scratch/", sections(definition)["environment"])
    assert {"HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"} <= set(writable)
    forwarded = re.search(r"grep -E '\^\((.*)\)\$'", sbatch).group(1).split("|")
    for var in writable:
        assert re.search(rf"^export {var}=\$\{{{var}:-\$(SCRATCH|HF_HOME|XDG_CACHE_HOME)/", sbatch, re.M), var
        assert var in forwarded, var
    binds = re.search(r'--bind "([^"]*)"', sbatch).group(1).split(",")
    assert "$SCRATCH" in binds and not any(b.endswith(":/scratch") for b in binds), binds


def test_base_reference_is_a_digest_without_a_tag(definition):
    """containers/image (Apptainer's docker transport) refuses name:tag@digest; the tag lives in %labels."""
    header, _ = rehearse.parse_definition(definition)
    reference = rehearse.docker_reference(header["From"])
    assert reference == {"name": "pytorch/pytorch", "tag": None,
                         "digest": labels(definition)["base.image.digest"]}
    assert labels(definition)["base.image.tag"].startswith("pytorch/pytorch:")
    with pytest.raises(rehearse.RehearsalError, match="both a tag and digest"):
        rehearse.docker_reference(labels(definition)["base.image.tag"] + "@" + reference["digest"])
    for valid in ("ubuntu", "nvcr.io/nvidia/pytorch:24.01-py3", "localhost:5000/a/b@sha256:" + "0" * 64):
        rehearse.docker_reference(valid)
    for invalid in ("Pytorch/pytorch", "pytorch/pytorch:", "pytorch/pytorch@sha256:xyz", "a//b"):
        with pytest.raises(rehearse.RehearsalError, match="not a valid docker reference"):
            rehearse.docker_reference(invalid)


def test_scriptlets_parse_under_the_interpreter_apptainer_uses(definition):
    """Each scriptlet under its interpreter (dash unless `-c` says otherwise), for both build variants.
    A syntax check only: the rehearsal below runs them."""
    _, parsed = rehearse.parse_definition(definition)
    for with_model in ("1", "0"):
        arguments = rehearse.build_arguments(parsed, {"WITH_MODEL": with_model})
        for name in ("post", "test", "runscript"):
            interp = rehearse.interpreter(parsed[name])
            assert interp == "/bin/sh", f"%{name} declares {interp}"
            body = rehearse.render(parsed[name].body, arguments)
            result = subprocess.run(["dash", "-n"], input=body, capture_output=True, text=True)
            assert result.returncode == 0, (name, result.stderr)
    assert "pip install -c /opt/constraints.container.txt /opt/src" in definition


def test_pins_agree_with_the_lock_file_and_params(definition):
    pins, arguments, label = lock_pins(), build_arguments(definition), labels(definition)
    base = sections(definition)[""]
    base_torch = re.fullmatch(r"pytorch/pytorch:([\d.]+)-.*", label["base.image.tag"]).group(1)
    assert base_torch == pins["torch"], "base image torch differs from requirements.lock"
    assert label["torch.version"] == pins["torch"]
    assert label["transformers.version"] == pins["transformers"]
    assert label["dvc.version"] == pins["dvc"]
    assert "pytorch/pytorch@" + label["base.image.digest"] == re.search(r"^From: (\S+)$", base, re.M).group(1)
    assert label["model.revision"] == "{{ MODEL_REVISION }}" and label["source.commit"] == "{{ GIT_COMMIT }}"
    assert rehearse.TORCH == f"torch=={pins['torch']}"     # the rehearsal's stand-in base has the same torch

    for profile in ("params.yaml", "profiles/cluster.yaml", "profiles/embedded.yaml", "profiles/smoke.yaml"):
        model = yaml.safe_load((REPO / profile).read_text())["model"]
        assert model["hf_revision"] == arguments["MODEL_REVISION"], profile
        assert model["hf_name"] == arguments["MODEL_NAME"], profile
    cluster = yaml.safe_load((REPO / "profiles" / "cluster.yaml").read_text())["model"]
    assert cluster["hf_local_path"] == arguments["MODEL_LOCAL_PATH"]


def test_drift_is_detected(definition, monkeypatch, tmp_path):
    """The pin checks above read the real files: a lock with another torch makes them fail."""
    drifted = tmp_path / "requirements.lock"
    drifted.write_text(re.sub(r"^torch==.*$", "torch==9.9.9", LOCK.read_text(), flags=re.M))
    monkeypatch.setattr(sys.modules[__name__], "LOCK", drifted)
    with pytest.raises(AssertionError, match="torch differs"):
        test_pins_agree_with_the_lock_file_and_params(definition)


FAKE_APPTAINER = r"""#!/bin/bash
# records what `apptainer build` is given (arguments, environment, the build context's files)
case $1 in
    build) { echo "args: $*"; echo "cwd: $PWD"; env | grep '^APPTAINER_'; } > "$FAKE_LOG"
           (cd src && find . -type f -printf '%P\n' | sort) > "$FAKE_TREE"
           printf 'image bytes' > "${@: -2:1}" ;;
    inspect) printf 'org.opencontainers.image.title: monotonic-robustness\ntorch.build: 2.13.0+cu126 (CUDA 12.6)\n' ;;
esac
"""


def test_build_script_copies_the_committed_tree_and_builds_on_scratch(tmp_path):
    """build.sh with a recording `apptainer`: the context is exactly the committed tree (not a deleted
    tracked file's absence, not untracked files), caches on scratch, the commit passed as a build argument,
    the image's sha256 and labels printed."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (clone / "README.md").unlink()                     # tracked, deleted in the work tree
    (clone / "untracked.txt").write_text("not committed\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "apptainer").write_text(FAKE_APPTAINER)
    (tmp_path / "bin" / "apptainer").chmod(0o755)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "SCRATCH": str(tmp_path / "s"),
           "FAKE_LOG": str(tmp_path / "log"), "FAKE_TREE": str(tmp_path / "tree")}
    image = tmp_path / "out.sif"
    result = subprocess.run(["bash", str(clone / "container" / "build.sh"), "--weightless", "--output", str(image)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    committed = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=clone, capture_output=True,
                               text=True, check=True).stdout.split()
    assert (tmp_path / "tree").read_text().split() == sorted(committed) and "README.md" in committed
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    log = (tmp_path / "log").read_text()
    assert f"--build-arg WITH_MODEL=0 --build-arg GIT_COMMIT={head} {image} pipeline.def" in log
    assert f"APPTAINER_CACHEDIR={tmp_path}/s/apptainer/cache" in log and f"APPTAINER_TMPDIR={tmp_path}/s/apptainer/tmp" in log
    assert f"cwd: {tmp_path}/s/apptainer/tmp/pipeline-build." in log
    assert "uncommitted changes are NOT in the image" in result.stderr
    assert f"sha256 {hashlib.sha256(b'image bytes').hexdigest()}" in result.stdout
    assert "torch.build: 2.13.0+cu126" in result.stdout and "image.title" not in result.stdout
    assert not (tmp_path / "home").exists() and not list((tmp_path / "s/apptainer/tmp").iterdir())


@pytest.mark.slow
def test_image_smoke_check_runs_against_this_checkout():
    """The %test script itself: a tiny forward pass and the monotonic verify, with the project's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MODEL_BAKED": "0"}
    result = subprocess.run([sys.executable, str(REPO / "container" / "smoke_check.py")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok: tiny GPT-NeoX forward" in result.stdout and "constrained modules" in result.stdout


# --- the rehearsal: the definition executed as Apptainer would, on a Debian stand-in for the base image ---

def rehearsal_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the container rehearsal needs root (debootstrap, chroot, mount); CI runs as root"
    missing = [tool for tool in ("debootstrap", "unshare", "chroot", "git") if shutil.which(tool) is None]
    return f"{', '.join(missing)} not installed (.ci/setup installs debootstrap when root)" if missing else None


def rehearsal(test):
    """slow + container, skipped with the reason where the rehearsal cannot run."""
    reason = rehearsal_unavailable()
    for mark in (pytest.mark.slow, pytest.mark.container, pytest.mark.skipif(reason is not None, reason=str(reason))):
        test = mark(test)
    return test


def rehearse_run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "container" / "rehearse.py"), *args], cwd=cwd,
                            capture_output=True, text=True, timeout=1800)
    print(result.stdout[-3000:], result.stderr[-3000:])
    return result


def image_root(build: subprocess.CompletedProcess) -> Path:
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return Path(re.search(r"^rehearsal image(?: \(cached\))?: (\S+)$", build.stdout, re.M).group(1))


@pytest.fixture(scope="module")
def rehearsal_image() -> Path:
    """The rehearsal image of the committed tree (WITH_MODEL=0), built or taken from the cache."""
    return image_root(rehearse_run("build"))


@rehearsal
def test_rehearsal_builds_the_committed_tree_as_apptainer_would(rehearsal_image):
    """%files, %post under dash, %environment, %test and a clean `pip check` passed (else no image);
    the labels carry the torch build, the model revision and the commit; /opt/src is the committed tree."""
    labels_json = json.loads((rehearsal_image / ".singularity.d" / "labels.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert labels_json["source.commit"] == head and labels_json["model.baked"] == "0"
    assert labels_json["torch.build"] == f"{lock_pins()['torch']}+cpu (CUDA None)"    # the stand-in's CPU build
    site = next((rehearsal_image / "opt/conda/lib").glob("python3.*/site-packages"))
    assert (site / f"transformers-{lock_pins()['transformers']}.dist-info").is_dir()
    assert not list(site.glob("pytest*")) and not list(site.glob("spython*"))    # runtime requirements only
    assert labels_json["model.revision"] == build_arguments(DEFINITION.read_text())["MODEL_REVISION"]
    committed = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split()
    copied = sorted(str(p.relative_to(rehearsal_image / "opt/src")) for p in (rehearsal_image / "opt/src").rglob("*")
                    if p.is_file() or p.is_symlink())
    assert set(committed) <= set(copied)       # plus what `pip install /opt/src` left there (build/, egg-info)
    assert all(p.startswith("build/") or ".egg-info/" in p for p in set(copied) - set(committed))
    assert "HF_HUB_OFFLINE=1" in (rehearsal_image / ".singularity.d/env/90-environment.sh").read_text()


@rehearsal
@pytest.mark.parametrize("bashism", ["set -euo pipefail", '[[ -n "$HOME" ]]'])
def test_rehearsal_fails_when_post_uses_bash_without_declaring_it(tmp_path, bashism):
    mutated = tmp_path / "pipeline.def"
    text = DEFINITION.read_text()
    assert "%post\n    # Every scriptlet" in text and "\n    set -eu\n" in text
    mutated.write_text(text.replace("\n    set -eu\n", f"\n    {bashism}\n    set -eu\n", 1))
    result = rehearse_run("--definition", str(mutated), "build")
    assert result.returncode == 1
    assert re.search(r"REHEARSAL FAILED: %post failed with exit status \d+ under /bin/sh", result.stderr)
    assert re.search(r"Illegal option -o pipefail|\[\[: not found", result.stdout + result.stderr)
    assert "rehearsal image" not in result.stdout


def host_run(ws: Path, *argv: str) -> str:
    result = subprocess.run(argv, cwd=ws, env=pipeline_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@rehearsal
def test_apptainer_exec_commands_run_inside_the_rehearsal_image_as_on_the_host(rehearsal_image, tmp_path):
    """docs/cluster.md's `apptainer exec --bind ... IMAGE python -m pipeline check-params` and `... IMAGE dvc repro
    STAGE`, inside the image (workspace and scratch bound, --cleanenv, the image's %environment): the same
    params verdict as the host, and the smoke profile's first stages (data, pretrain) write the host's
    outputs and dvc.lock byte for byte. The stand-in's Python is the host's CPython (rehearse.STANDIN_PYTHON):
    the data stage's corpus is the interpreter's standard library, and provenance records its version. Only
    outputs/runs/ differs (run facts by design: host name, time, git commit, argv), so it is not compared."""
    workspaces = {name: smoke_checkout(tmp_path / name) for name in ("inside", "host")}
    inside = workspaces["inside"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def exec_inside(*argv: str) -> str:
        result = rehearse_run("exec", "--bind", str(inside), "--bind", f"{scratch}:/scratch", "--pwd", str(inside),
                              "--env", "TQDM_DISABLE=1", "--env", "OMP_NUM_THREADS=1", "--", *argv)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    assert exec_inside("python", "-c", "import platform; print(platform.python_version())").split()[-1] == \
        platform.python_version(), "the stand-in's Python is not the host's (rehearse.STANDIN_PYTHON)"
    # --env overrides %environment's unconditional `export TOKENIZERS_PARALLELISM=false`, as in Apptainer
    assert exec_inside("sh", "-c", "echo tp=$TOKENIZERS_PARALLELISM").split()[-1] == "tp=false"
    result = rehearse_run("exec", "--env", "TOKENIZERS_PARALLELISM=true", "--", "sh", "-c",
                          "echo tp=$TOKENIZERS_PARALLELISM")
    assert result.returncode == 0 and result.stdout.split()[-1] == "tp=true", result.stdout[-2000:]
    assert exec_inside("python", "-m", "pipeline", "check-params").splitlines()[-1] == \
        host_run(inside, sys.executable, "-m", "pipeline", "check-params").splitlines()[-1]
    ran = exec_inside("dvc", "repro", "pretrain")
    assert "Running stage 'data'" in ran and "Running stage 'pretrain'" in ran
    host_run(workspaces["host"], sys.executable, "-m", "dvc", "repro", "pretrain")

    files = {name: sorted(p.relative_to(ws) for p in (ws / "outputs").rglob("*") if p.is_file()
                          and "runs" not in p.relative_to(ws / "outputs").parts[:1]) + [Path("dvc.lock")]
             for name, ws in workspaces.items()}
    assert files["inside"] == files["host"]
    assert Path("outputs/models/pretrained/model.safetensors") in files["host"]
    assert any(p.parts[:2] == ("outputs", "data") for p in files["host"]), files["host"]
    for rel in files["host"]:
        assert (inside / rel).read_bytes() == (workspaces["host"] / rel).read_bytes(), rel
