#!/usr/bin/env python3
"""Rehearse container/pipeline.def without Apptainer: execute its scriptlets in a chroot as Apptainer would.

    sudo python3 container/rehearse.py build [--definition FILE] [--with-model 0]
    sudo python3 container/rehearse.py exec [--bind SRC[:DST]]... [--pwd DIR] [--env K=V]... -- CMD ...

`build`: a Debian bookworm root (debootstrap --variant=minbase) stands in for the PyTorch base image: the
image's layout where it matters (a Python with pip at /opt/conda/bin first on PATH, `python` and `pip` by
those names, the CPU build of the pinned torch preinstalled; the CUDA libraries are absent). Its Python is
the CPython running this script (see STANDIN_PYTHON), so that what the stages compute from the interpreter
(the embedded corpus is its standard library) is the host's. On a copy of
it, for the parsed definition: `From:` is checked against the docker reference grammar (no tag+digest),
%files are copied from the build context (`git archive HEAD`, as container/build.sh does), %post runs in
the chroot under the interpreter Apptainer would use (/bin/sh, dash here as on Ubuntu, unless the header
says `-c INTERP`) with `set -e` and the %arguments substituted, %environment is written where Apptainer
puts it and sourced by /bin/sh, %test runs the same way, and `pip check` must be clean.

`exec`: `apptainer exec --cleanenv` on the rehearsal image: the image read-only, /proc, /dev, /tmp and the
--bind paths mounted, an empty environment, the image's environment scripts sourced by /bin/sh, then
APPTAINERENV_* (prefix removed) and --env on top (they override %environment, as in Apptainer), then CMD in --pwd.

Roots are cached outside the repository ($PIPELINE_REHEARSAL_CACHE, default /var/cache/pipeline-rehearsal):
the base by its recipe, an image by base + definition + build arguments + committed tree. Needs root,
debootstrap, unshare and network access to Debian, PyPI and torch's CPU index ($PIPELINE_REHEARSAL_TORCH_INDEX;
pip's find-links may serve the wheel instead) for the first build. Standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("PIPELINE_REHEARSAL_CACHE", "/var/cache/pipeline-rehearsal"))
SUITE, MIRROR = "bookworm", os.environ.get("PIPELINE_REHEARSAL_MIRROR", "http://deb.debian.org/debian")
TORCH = "torch==2.13.0"
# the CPU build (`+cpu`: PyPI's CUDA build never matches), for the stand-in's Python and platform
TORCH_INDEX = os.environ.get("PIPELINE_REHEARSAL_TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
TORCH_PLATFORM = "manylinux_2_28"     # torch 2.13's Linux wheels; bookworm's glibc is 2.36
# The stand-in's Python: this interpreter's installation (pyenv, python.org builds) copied to the same path
# (libpython is found by that path), or bookworm's python3 where this one is the system's (/usr).
STANDIN_PYTHON = "/usr/bin/python3" if sys.base_prefix == "/usr" else \
    f"{sys.base_prefix}/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
# the PyTorch images' PATH (conda's Python first); Apptainer's docker bootstrap keeps it in this file
DOCKER_PATH = "/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_DIR = ".singularity.d/env"
# pip inside uses the host's bundle: a pip not patched as Debian's is reads its own certifi bundle otherwise
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
BASE_APT = """set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends python3 python3-venv
apt-get clean
"""
BASE_PYTHON = f"""set -e
{STANDIN_PYTHON} -m venv /opt/conda
/opt/conda/bin/pip install -q --disable-pip-version-check --no-cache-dir /tmp/wheels/torch-*.whl
rm -rf /tmp/wheels
mkdir -p /{ENV_DIR}
echo 'export PATH="{DOCKER_PATH}"' > /{ENV_DIR}/10-docker2singularity.sh
"""
KEEP_IMAGES = 2


class RehearsalError(RuntimeError):
    """The definition file would not build (or its %test would fail)."""


# --- the definition file --------------------------------------------------------------------------------

@dataclass
class Section:
    args: str     # the header's options, e.g. "-c /bin/bash"
    body: str


def parse_definition(text: str) -> tuple[dict[str, str], dict[str, Section]]:
    """Header keywords (Bootstrap, From, ...) and %sections with their header options."""
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*(.*?)\s*$", line)
        if match:
            current = sections[match.group(1)] = Section(match.group(2), "")
        elif current is not None:
            current.body += line + "\n"
        elif re.match(r"^\s*(\w+):\s*(.*?)\s*$", line) and not line.lstrip().startswith("#"):
            key, value = line.split(":", 1)
            header[key.strip()] = value.strip()
    return header, sections


def interpreter(section: Section) -> str:
    """Apptainer runs a scriptlet with /bin/sh unless its header says `-c INTERP`."""
    options = shlex.split(section.args)
    return options[options.index("-c") + 1] if "-c" in options else "/bin/sh"


def build_arguments(sections: dict[str, Section], overrides: dict[str, str]) -> dict[str, str]:
    defaults = dict(line.strip().split("=", 1) for line in sections["arguments"].body.splitlines()
                    if "=" in line and not line.strip().startswith("#")) if "arguments" in sections else {}
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise RehearsalError(f"build arguments {sorted(unknown)} are not declared in %arguments")
    return {**defaults, **overrides}


def render(text: str, arguments: dict[str, str]) -> str:
    """Apptainer's {{ VAR }} substitution; an undefined argument fails the build."""
    def value(match):
        if match.group(1) not in arguments:
            raise RehearsalError(f"build argument {match.group(1)!r} is used but not defined")
        return arguments[match.group(1)]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", value, text)


# docker reference grammar (distribution/reference): name[:tag][@digest]
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
# the first path element is a registry only with a dot, a port or as localhost (else it is a lowercase component)
DOMAIN = rf"(?:localhost(?::[0-9]+)?|{LABEL}(?:\.{LABEL})+(?::[0-9]+)?|{LABEL}:[0-9]+)"
REFERENCE = re.compile(rf"^(?P<name>(?:{DOMAIN}/)?{COMPONENT}(?:/{COMPONENT})*)(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
                       r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$")


def docker_reference(reference: str) -> dict[str, str | None]:
    """name, tag and digest of a `Bootstrap: docker` From: reference, as containers/image reads it; a
    reference with both a tag and a digest is refused, as containers/image refuses it (issue 1736)."""
    match = REFERENCE.match(reference)
    if not match:
        raise RehearsalError(f"From: {reference!r} is not a valid docker reference")
    if match.group("tag") and match.group("digest"):
        raise RehearsalError(f"From: {reference!r}: Docker references with both a tag and digest are currently "
                             "not supported (containers/image); use name@sha256:... and keep the tag in %labels")
    return match.groupdict()


# --- running things in a root ---------------------------------------------------------------------------

def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(shlex.quote(str(a)) for a in argv), flush=True)
    return subprocess.run([str(a) for a in argv], **kwargs)


def in_root(root: Path, argv: list[str], env: dict[str, str], *, binds: list[tuple[str, str]] = (),
            pwd: str = "/", read_only: bool = False) -> int:
    """argv inside root (chroot) in a private mount namespace: /proc, /dev, the binds (and /tmp when the
    root is read-only, as Apptainer binds it), with exactly env; returns the exit status."""
    mounts = []
    if read_only:
        for _, dst in binds:
            (root / dst.lstrip("/")).mkdir(parents=True, exist_ok=True)
        mounts += [f"mount --bind {q(root)} {q(root)}", f"mount -o remount,bind,ro {q(root)}",
                   f"mount --bind /tmp {q(root / 'tmp')}"]
    mounts += [f"mount -t proc proc {q(root / 'proc')}", f"mount --rbind /dev {q(root / 'dev')}"]
    mounts += [f"mount --bind {q(src)} {q(root / dst.lstrip('/'))}" for src, dst in binds]
    inner = f"cd {q(pwd)} && exec \"$@\""
    script = " && ".join(mounts) + f" && exec chroot {q(root)} /usr/bin/env -i " + \
        " ".join(q(f"{k}={v}") for k, v in env.items()) + f" /bin/sh -c {q(inner)} sh " + \
        " ".join(q(a) for a in argv)
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script]).returncode


def q(value) -> str:
    return shlex.quote(str(value))


def action(command: str, overrides: dict[str, str] | None = None) -> list[str]:
    """Apptainer's action scripts: source the image's environment files with /bin/sh, then set the
    APPTAINERENV_/--env variables over them, then run. That order is Apptainer's ("Environment Variable
    Precedence", https://apptainer.org/docs/user/main/environment_and_metadata.html: %environment first,
    then APPTAINERENV_ / --env / --env-file injected "so they can override or modify any previous values")."""
    exports = "".join(f"export {k}={q(v)}; " for k, v in (overrides or {}).items())
    return ["/bin/sh", "-c", f'for f in /{ENV_DIR}/*.sh; do [ -e "$f" ] && . "$f"; done; {exports}{command}', "sh"]


# --- the base (stand-in for the PyTorch image) and the image ---------------------------------------------

def digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def complete(root: Path) -> bool:
    return (root.parent / f"{root.name}.complete").exists()


def mark_complete(tmp: Path, root: Path) -> None:
    tmp.rename(root)
    (root.parent / f"{root.name}.complete").touch()


def copy_network_config(root: Path) -> None:
    """resolv.conf and the host's CA bundle (pip inside needs both; the bundle may hold a proxy's CA)."""
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    (root / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    shutil.copy2(CA_BUNDLE, root / CA_BUNDLE.lstrip("/"))


def standin_interpreter(root: Path) -> None:
    """Copy this interpreter's installation into root at the same path (no site-packages, no test suite);
    nothing to copy for bookworm's own python3."""
    if STANDIN_PYTHON == "/usr/bin/python3":
        return
    prefix = Path(sys.base_prefix)
    stdlib = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}"

    def skipped(directory: str, names: list[str]) -> list[str]:
        if Path(directory) == prefix / "bin":      # the interpreter, not the scripts of its packages
            return [n for n in names if not n.startswith("python")]
        return ["site-packages", "test"] if Path(directory) == stdlib else []
    shutil.copytree(prefix, root / str(prefix).lstrip("/"), symlinks=True, ignore=skipped, dirs_exist_ok=True)


def download_torch(root: Path, wheels: Path) -> None:
    """The CPU build of TORCH for the stand-in's Python and platform, whatever the host's interpreter and
    pip configuration (the host's find-links, where it has one, still serves the file)."""
    probe = "import platform, sys; print('%d.%d' % sys.version_info[:2], platform.machine())"
    version, machine = subprocess.run([shutil.which("chroot"), root, STANDIN_PYTHON, "-c", probe],
                                      capture_output=True, text=True, check=True, env={}).stdout.split()
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--retries", "1", f"{TORCH}+cpu",
            "--extra-index-url", TORCH_INDEX, "--only-binary=:all:", "--implementation", "cp",
            "--python-version", version, "--abi", f"cp{version.replace('.', '')}",
            "--platform", f"{TORCH_PLATFORM}_{machine}", "-d", wheels]
    if run(argv).returncode:
        raise RehearsalError(f"pip download {TORCH}+cpu for Python {version} on {machine} failed")


def base_root(cache: Path) -> Path:
    python_build = f"{STANDIN_PYTHON} {sys.version}"
    root = cache / f"base-{digest(SUITE, MIRROR, TORCH, python_build, BASE_APT, BASE_PYTHON)}"
    if complete(root):
        return root
    for tool in ("debootstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise RehearsalError(f"{tool} not found (apt-get install debootstrap util-linux coreutils)")
    tmp = root.with_name(root.name + ".tmp")
    bootstrapped = tmp / ".rehearsal-debootstrapped"
    if not bootstrapped.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        if run(["debootstrap", "--variant=minbase", SUITE, tmp, MIRROR]).returncode:
            raise RehearsalError("debootstrap failed")
        bootstrapped.touch()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "PIP_CERT": CA_BUNDLE}
    for script in (BASE_APT, BASE_PYTHON):
        copy_network_config(tmp)      # again after apt: ca-certificates (a dependency) regenerates the bundle
        if script is BASE_PYTHON:     # apt brought the libraries a copied interpreter links against
            standin_interpreter(tmp)
            download_torch(tmp, tmp / "tmp" / "wheels")
        if in_root(tmp, ["/bin/sh", "-c", script], env):
            raise RehearsalError("preparing the base root failed")
    bootstrapped.unlink()
    mark_complete(tmp, root)
    for old in cache.glob("base-*.complete"):      # bases of an older recipe
        if old.name != f"{root.name}.complete":
            old.unlink()
            shutil.rmtree(cache / old.name[:-len(".complete")], ignore_errors=True)
    return root


def build_context(destination: Path) -> None:
    """The committed tree, as container/build.sh copies it: `git archive HEAD` into destination/src."""
    (destination / "src").mkdir(parents=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", destination / "src"], input=archive.stdout, check=True)


def scriptlet(root: Path, name: str, section: Section, arguments: dict[str, str], env: dict[str, str],
              errexit: bool) -> None:
    path = root / f".rehearsal-{name}.sh"
    path.write_text(render(section.body, arguments))
    interp = interpreter(section)
    if not (root / interp.lstrip("/")).exists():
        raise RehearsalError(f"%{name}: interpreter {interp} does not exist in the image")
    command = f"exec {q(interp)} {'-e ' if errexit else ''}/{path.name}"
    print(f"--- %{name} under {interp}", flush=True)
    status = in_root(root, action(command) if name == "test" else ["/bin/sh", "-c", command], env)
    path.unlink()
    if status:
        raise RehearsalError(f"%{name} failed with exit status {status} under {interp}")


def image_key(base: Path, definition: str, arguments: dict[str, str]) -> str:
    tree = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD^{tree}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    return digest(base.name, definition, json.dumps(arguments, sort_keys=True), tree)


def build(definition_file: Path | None, overrides: dict[str, str], cache: Path) -> Path:
    """The rehearsal image's root for the committed tree (cached), built as Apptainer would build it."""
    with tempfile.TemporaryDirectory(prefix="rehearsal-context-") as context:
        context = Path(context)
        build_context(context)
        text = (definition_file or context / "src" / "container" / "pipeline.def").read_text()
        header, sections = parse_definition(text)
        if header.get("Bootstrap") != "docker":
            raise RehearsalError(f"Bootstrap: {header.get('Bootstrap')!r}: only docker is rehearsed")
        docker_reference(header.get("From", ""))
        arguments = build_arguments(sections, overrides)
        cache.mkdir(parents=True, exist_ok=True)
        base = base_root(cache)
        root = cache / f"image-{image_key(base, text, arguments)}"
        if complete(root):
            print(f"rehearsal image (cached): {root}")
            return root
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        run(["cp", "-a", "--reflink=auto", base, tmp], check=True)
        try:
            assemble(tmp, context, sections, arguments)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        mark_complete(tmp, root)
        prune(cache, keep=root)
        print(f"rehearsal image: {root}")
        return root


def assemble(root: Path, context: Path, sections: dict[str, Section], arguments: dict[str, str]) -> None:
    """%files, %post, %environment and %labels, %test, pip check: on a copy of the base."""
    for line in sections.get("files", Section("", "")).body.splitlines():
        if line.strip() and not line.strip().startswith("#"):
            src, dst = render(line, arguments).split()
            run(["cp", "-a", context / src, root / dst.lstrip("/")], check=True)
    post_env = {"PATH": DOCKER_PATH, "HOME": "/root", "PIP_CERT": CA_BUNDLE, "APPTAINER_ROOTFS": "/",
                "APPTAINER_LABELS": "/.rehearsal-labels", "APPTAINER_ENVIRONMENT": f"/{ENV_DIR}/91-environment.sh"}
    if "post" in sections:
        scriptlet(root, "post", sections["post"], arguments, post_env, errexit=True)
    write_metadata(root, sections, arguments)
    if "test" in sections:
        scriptlet(root, "test", sections["test"], arguments, {"HOME": "/root"}, errexit=False)
    if in_root(root, action("exec python -m pip check"), {"HOME": "/root"}):
        raise RehearsalError("pip check inside the image is not clean")


def write_metadata(root: Path, sections: dict[str, Section], arguments: dict[str, str]) -> None:
    """%environment to 90-environment.sh, %labels plus what %post appended to $APPTAINER_LABELS to labels.json."""
    (root / ENV_DIR).mkdir(parents=True, exist_ok=True)
    (root / ENV_DIR / "90-environment.sh").write_text(render(sections.get("environment", Section("", "")).body,
                                                             arguments))
    lines = render(sections.get("labels", Section("", "")).body, arguments).splitlines()
    appended = root / ".rehearsal-labels"
    if appended.exists():
        lines += appended.read_text().splitlines()
        appended.unlink()
    labels = dict(line.strip().split(None, 1) for line in lines if line.strip())
    (root / ".singularity.d" / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")


def prune(cache: Path, keep: Path) -> None:
    images = sorted((p for p in cache.glob("image-*") if p.is_dir() and complete(p) and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[KEEP_IMAGES - 1:]:
        (old.parent / f"{old.name}.complete").unlink()
        shutil.rmtree(old)


def exec_in_image(root: Path, argv: list[str], binds: list[str], pwd: str, extra_env: list[str]) -> int:
    """`apptainer exec --cleanenv --bind ... --pwd ... IMAGE argv` on the rehearsal root."""
    overrides = {k[len("APPTAINERENV_"):]: v for k, v in os.environ.items() if k.startswith("APPTAINERENV_")}
    overrides.update(item.split("=", 1) for item in extra_env)
    pairs = [(b.split(":")[0], b.split(":")[1] if ":" in b else b.split(":")[0]) for b in binds]
    return in_root(root, action('exec "$@"', overrides) + argv, {"HOME": "/root"}, binds=pairs, pwd=pwd,
                   read_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"root cache (default {CACHE})")
    parser.add_argument("--definition", type=Path, help="definition file (default: the committed one)")
    parser.add_argument("--with-model", default="0", help="the WITH_MODEL build argument (default 0)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or reuse) the rehearsal image and print its root")
    ex = sub.add_parser("exec", help="run a command in the rehearsal image, as `apptainer exec --cleanenv`")
    ex.add_argument("--bind", action="append", default=[], help="SRC[:DST], as apptainer --bind")
    ex.add_argument("--pwd", default="/")
    ex.add_argument("--env", action="append", default=[], help="K=V, as apptainer --env")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (debootstrap, chroot, mount)")
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        root = build(args.definition, {"WITH_MODEL": args.with_model, "GIT_COMMIT": commit}, args.cache)
    except RehearsalError as error:
        print(f"REHEARSAL FAILED: {error}", file=sys.stderr)
        return 1
    if args.command == "build":
        return 0
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return exec_in_image(root, cmd, args.bind, args.pwd, args.env)


if __name__ == "__main__":
    sys.exit(main())
