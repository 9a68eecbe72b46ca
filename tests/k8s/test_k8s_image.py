"""The Dockerfile cannot be built here (no container engine), so it is read and held to what the
manifests expect of the image: a pinned CUDA PyTorch base, the project installed, the entry point
where the jobs call it, a non-root user matching the pods' runAsUser, and no credentials."""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path

import yaml

from tests.support.k8s_validation import SECRET_NAMES
from tests.support.paths import ROOT

DOCKERFILE = ROOT / "Dockerfile"
CREDENTIAL_FILES = (".aws", "*.pem", "*.key", "kubeconfig", ".kube", ".env")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def env_names(arguments: str) -> list[str]:
    return [item.partition("=")[0] for item in shlex.split(arguments)]


def pod_template() -> dict:
    return yaml.safe_load((ROOT / "k8s" / "base" / "pytorchjob.yaml").read_text())["spec"][
        "pytorchReplicaSpecs"
    ]["Worker"]["template"]["spec"]


def test_the_base_is_a_pinned_cuda_pytorch_image():
    (base,) = [args for word, args in instructions() if word == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "pytorch/pytorch"
    assert "cuda" in tag and tag != "latest"
    torch_pin = re.search(r'"torch==([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert tag.startswith(f"{torch_pin}-"), "the base's torch is the release pyproject.toml pins"


def test_the_project_is_installed_and_the_entry_point_is_where_the_jobs_call_it():
    steps = instructions()
    (workdir,) = [args for word, args in steps if word == "WORKDIR"]
    copied = []
    for word, args in steps:
        if word == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.append(source.rstrip("/"))
    for package in ("models", "data_pipeline", "trainer", "launch", "pyproject.toml"):
        assert package in copied
    assert any(word == "RUN" and re.search(r"pip install\b.*\s\.(\s|$)", args) for word, args in steps)
    container = pod_template()["containers"][0]
    entry = container["command"][0]
    assert entry.startswith(workdir.rstrip("/") + "/")
    script = ROOT / entry.removeprefix(workdir.rstrip("/") + "/")
    assert script.is_file() and script.stat().st_mode & 0o111
    assert script.relative_to(ROOT).parts[0] in copied
    # configs/cluster.yaml links into k8s/, which is copied too, so the link resolves in the image.
    assert (ROOT / "configs" / "cluster.yaml").resolve().relative_to(ROOT).parts[0] in copied


def test_the_user_is_not_root_and_is_the_pods_user():
    steps = instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid, so runAsNonRoot can be checked"
    security = pod_template()["securityContext"]
    assert int(uid) == security["runAsUser"] and int(gid or uid) == security["runAsGroup"]
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    assert all(word != "RUN" for word, _ in steps[last_user:]), "nothing runs after dropping root"
    home = [shlex.split(a)[0].partition("=")[2] for w, a in steps if w == "ENV" and a.startswith("HOME=")]
    env = {e["name"]: e.get("value") for e in pod_template()["containers"][0]["env"]}
    assert home == [env["HOME"]]


def test_no_credentials_are_baked_in():
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            for name in env_names(args):
                assert not SECRET_NAMES.search(name), f"{word} {name}: credentials come at run time"
        if word in ("COPY", "ADD"):
            for source in shlex.split(args)[:-1]:
                assert not any(fnmatch.fnmatch(Path(source).name, p) for p in CREDENTIAL_FILES), source
    assert not re.search(r"AKIA[0-9A-Z]{16}", DOCKERFILE.read_text()), "an AWS access key id"
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    for pattern in (".git", ".venv", "runs", "data", "**/.aws", "**/*.pem", "**/.kube", ".env"):
        assert pattern in ignored, f".dockerignore must exclude {pattern}"
