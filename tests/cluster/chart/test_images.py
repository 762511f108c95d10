"""The Dockerfiles agree with the project: Python, uv, extras, entrypoints, uid, context.

These tests read the Dockerfiles and check them against pyproject.toml,
uv.lock, hack/setup, the chart and what the operator puts into worker pods.
The images themselves are built from these Dockerfiles by hack/build-images
and run on the dev cluster's real node (tests/cluster/k8s/test_real_node.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s.cluster import REPO_ROOT
from packaging.specifiers import SpecifierSet

from pgw_operator import desired
from pgw_operator.spec import PoolSpec

from .conftest import CHART, Helm, one, parse_manifests
from builders import pool_spec

DOCKER = REPO_ROOT / "docker"
IMAGES = ("operator", "worker")
PYPROJECT: dict[str, Any] = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, value = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return instructions


def dockerfile(image: str) -> list[Instruction]:
    return parse_dockerfile(DOCKER / f"{image}.Dockerfile")


def values_of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.value for i in instructions if i.keyword == keyword]


def arg_default(instructions: list[Instruction], name: str) -> str:
    for value in values_of(instructions, "ARG"):
        key, _, default = value.partition("=")
        if key == name:
            return default
    raise AssertionError(f"no ARG {name}")


def env_of(instructions: list[Instruction], stage: int = -1) -> dict[str, str]:
    """ENV of one stage (default: the final one)."""
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append(instruction)
    env: dict[str, str] = {}
    for value in values_of(stages[stage], "ENV"):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def uv_commands(instructions: list[Instruction]) -> list[list[str]]:
    """Every ``uv ...`` command of the RUN steps, in order (``&&`` chains split)."""
    commands = []
    for run in values_of(instructions, "RUN"):
        for part in run.split("&&"):
            argv = shlex.split(part)
            if argv and argv[0] == "uv":
                commands.append(argv)
    return commands


def uv_sync_commands(instructions: list[Instruction]) -> list[list[str]]:
    return [c for c in uv_commands(instructions) if c[1] == "sync"]


def option(command: list[str], name: str) -> list[str]:
    """The values given to ``name`` in ``command`` (``--extra a --extra b`` -> [a, b])."""
    return [command[i + 1] for i, arg in enumerate(command) if arg == name]


def exec_form(instructions: list[Instruction], keyword: str) -> list[str]:
    found = values_of(instructions, keyword)
    assert len(found) == 1, f"expected one {keyword}"
    parsed: list[str] = json.loads(found[0])  # exec form only: no shell in between
    return parsed


def uv_binary() -> Path:
    version = hack_setup_uv_version()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    uv = cache / "prefect-gpu-workers" / f"uv-{version}" / "bin" / "uv"
    if not uv.exists():
        pytest.fail(f"{uv} is missing: run hack/setup")
    return uv


def hack_setup_uv_version() -> str:
    match = re.search(r"^UV_VERSION=(\S+)$", (REPO_ROOT / "hack" / "setup").read_text(), re.M)
    assert match, "hack/setup pins no UV_VERSION"
    return match.group(1)


def sample_spec() -> PoolSpec:
    return pool_spec()


# --- Python, uv, extras -------------------------------------------------------------


@pytest.mark.parametrize("image", IMAGES)
def test_base_image_python_is_the_project_python(image: str) -> None:
    instructions = dockerfile(image)
    python = arg_default(instructions, "PYTHON_VERSION")
    froms = values_of(instructions, "FROM")
    assert froms, "no FROM"
    # Every stage on one base: the public Python image unless the build says otherwise.
    assert arg_default(instructions, "BASE_IMAGE") == "python:${PYTHON_VERSION}-slim"
    for base in froms:
        assert base.split()[0] == "${BASE_IMAGE}", base
    assert f"{python}.0" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert python == PYPROJECT["tool"]["mypy"]["python_version"]
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + python.replace(".", "")


@pytest.mark.parametrize("image", IMAGES)
def test_uv_is_the_version_hack_setup_pins(image: str) -> None:
    instructions = dockerfile(image)
    assert arg_default(instructions, "UV_VERSION") == hack_setup_uv_version()
    runs = values_of(instructions, "RUN")
    assert any('/opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"' in r for r in runs)


def test_worker_image_installs_its_extra_from_the_lock_without_dev_tools() -> None:
    assert "worker" in PYPROJECT["project"]["optional-dependencies"]
    lock = tomllib.loads((REPO_ROOT / "uv.lock").read_text())
    project = next(p for p in lock["package"] if p["name"] == PYPROJECT["project"]["name"])
    assert "worker" in project["metadata"]["provides-extras"]

    instructions = dockerfile("worker")
    commands = uv_sync_commands(instructions)
    assert len(commands) == 2, "one dependency layer, one project layer"
    # The worker extra unless the build leaves it out (the tests' image: no torch).
    assert arg_default(instructions, "UV_EXTRAS") == '"--extra worker"'
    for command in commands:
        assert "--frozen" in command, "install exactly uv.lock"
        assert "--no-default-groups" in command, "no dev group in images"
        assert "--all-extras" not in command
        assert "${UV_EXTRAS}" in command
    assert "--no-install-project" in commands[0]
    assert "--no-editable" in commands[1], "the project must be copied into the venv"


def test_operator_image_installs_the_locked_operator_extra_without_prefect() -> None:
    assert "operator" in PYPROJECT["project"]["optional-dependencies"]
    commands = uv_commands(dockerfile("operator"))
    verbs = [c[1:3] if c[1] == "pip" else c[1:2] for c in commands]
    assert verbs == [["export"], ["venv"], ["pip", "install"], ["pip", "install"]]
    export, _venv, deps, project = commands
    # The dependency layer: exactly uv.lock's operator set, Prefect pruned, hashes checked.
    assert "--frozen" in export, "install exactly uv.lock"
    assert "--no-default-groups" in export, "no dev group in images"
    assert "--all-extras" not in export
    assert option(export, "--extra") == ["operator"]
    assert option(export, "--prune") == ["prefect"]
    assert "--no-emit-project" in export
    assert "--no-hashes" not in export
    (requirements,) = option(export, "--output-file")
    assert option(deps, "-r") == [requirements]
    assert {"--require-hashes", "--no-deps"} <= set(deps)
    # The project layer: copied into the venv (not editable), nothing resolved.
    assert project[3:] == ["--no-deps", "."]


def lock_export(extra: str, *more: str) -> set[str]:
    """Package names uv.lock installs for the project with ``extra``, no dev group."""
    proc = subprocess.run(
        [
            str(uv_binary()),
            "export",
            "--frozen",
            "--no-default-groups",
            "--extra",
            extra,
            "--no-hashes",
            "--no-emit-project",
            "--format",
            "requirements-txt",
            *more,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = set()
    for line in proc.stdout.splitlines():
        if line and not line.startswith(("#", " ")):
            names.add(re.split(r"[=<>~;\[ ]", line, maxsplit=1)[0].lower())
    return names


def test_lock_keeps_prefect_and_torch_out_of_the_operator_image() -> None:
    operator = lock_export("operator", "--prune", "prefect")
    worker = lock_export("worker")
    assert {"kopf", "kubernetes", "prometheus-client", "httpx", "urllib3"} <= operator
    # Pruning drops Prefect's own dependencies too, not just the one package.
    assert not {"prefect", "fastapi", "sqlalchemy", "uvicorn"} & operator
    assert "torch" not in operator
    assert not {n for n in operator if n.startswith("nvidia-") and n != "nvidia-ml-py"}
    assert {"torch", "prefect"} <= worker
    assert "kopf" not in worker
    assert "lupa" not in worker
    assert "pytest" not in worker


# --- entrypoints, users, paths ------------------------------------------------------------


def test_worker_entrypoint_is_the_command_the_operator_puts_in_pods() -> None:
    instructions = dockerfile("worker")
    command = desired.worker_command(sample_spec())
    assert exec_form(instructions, "ENTRYPOINT") == [command[0]]
    assert command[0] in PYPROJECT["project"]["scripts"]
    assert env_of(instructions)["PATH"].startswith("/opt/venv/bin:")
    # The installed entrypoint knows the subcommand and every flag the pods pass.
    script = Path(sys.executable).parent / command[0]
    proc = subprocess.run(
        [str(script), command[1], "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (
        f"`{command[0]} {command[1]} --help` failed; the pods run {command}:\n{proc.stderr}"
    )
    for flag in (arg for arg in command[2:] if arg.startswith("--")):
        assert flag in proc.stdout, f"{command[0]} {command[1]} has no {flag}"


def test_worker_image_runs_as_the_pod_uid_with_prefect_home_writable() -> None:
    instructions = dockerfile("worker")
    assert values_of(instructions, "USER") == [f"{desired.WORKER_UID}:{desired.WORKER_UID}"]
    env = env_of(instructions)
    assert env["PREFECT_HOME"] == desired.PREFECT_HOME
    uid = desired.WORKER_UID
    assert any(
        f"useradd --uid {uid}" in run
        and f"install -d -o {uid} -g {uid} {desired.PREFECT_HOME}" in run
        for run in values_of(instructions, "RUN")
    )
    # Caches go to /tmp, an emptyDir in worker pods (the root filesystem is read-only).
    mounts = desired.desired_deployment("p", "ns", "uid", sample_spec())["spec"]["template"]
    paths = {m["mountPath"] for m in mounts["spec"]["containers"][0]["volumeMounts"]}
    assert {desired.PREFECT_HOME, "/tmp"} <= paths
    for key in ("XDG_CACHE_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[key].startswith("/tmp/"), key


def test_operator_image_matches_the_chart(helm: Helm, tmp_path: Path) -> None:
    instructions = dockerfile("operator")
    manifests = parse_manifests(helm.render(None, tmp_dir=tmp_path))
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert exec_form(instructions, "ENTRYPOINT") == container["command"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert values_of(instructions, "USER") == [f"{uid}:{uid}"]
    assert any(f"useradd --uid {uid}" in run for run in values_of(instructions, "RUN"))
    # Same environment in the image and in the chart's pod (read-only root, /tmp writable).
    # (Values, not the downward API's POD_NAME/POD_NAMESPACE.)
    chart_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    image_env = env_of(instructions)
    for key in ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PREFECT_HOME"):
        assert chart_env[key] == image_env[key], key
    assert image_env["PREFECT_HOME"].startswith("/tmp/")
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    default_cmd = exec_form(instructions, "CMD")
    assert default_cmd == ["--liveness", f"http://0.0.0.0:{values['healthPort']}/healthz"]


@pytest.mark.parametrize("image", IMAGES)
def test_build_context_lets_in_exactly_what_the_install_needs(image: str) -> None:
    ignore = (DOCKER / f"{image}.Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "allowlist: exclude everything first"
    roots = set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"])
    needed = {"pyproject.toml", "uv.lock", PYPROJECT["project"]["readme"]} | roots
    assert allowed == needed
    copied: set[str] = set()
    for value in values_of(dockerfile(image), "COPY"):
        if value.startswith("--from="):
            continue
        copied.update(p.rstrip("/") for p in value.split()[:-1])
    assert copied == needed
    for path in needed:
        assert (REPO_ROOT / path).exists(), path
