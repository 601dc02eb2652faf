"""The Dockerfiles, read without a Docker engine (none can run here): base image pinned to an
exact Python patch release of a named Debian suite, a non-root USER, only paths that exist
copied in, dependencies installed from exact pins with --no-deps and checked with `pip check`,
an entrypoint the package provides. The lock file pins every runtime dependency of
pyproject.toml (never a dev one) at a version its specifier accepts.

Not checked here (needs an engine or a registry): that the base tag still exists, that the
build succeeds, that the lock is complete (`pip check` in the build does that), image size."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.manifests import DEPLOY, REPO, one, pod_spec, render

IMAGES = DEPLOY / "images"
LOCK = IMAGES / "requirements.lock"
BUILD_LOCK = IMAGES / "build-requirements.lock"
DOCKERFILES = {"extender": IMAGES / "extender.Dockerfile", "agent": IMAGES / "agent.Dockerfile"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+!-]+)", line.strip())
        assert m, f"{path.name}: not an exact pin: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = m[2]
    return pins


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_image_is_an_exact_slim_python_311_release(name: str) -> None:
    froms = [a for i, a in instructions(DOCKERFILES[name]) if i == "FROM"]
    assert len(froms) == 1
    m = re.fullmatch(r"python:3\.11\.(\d+)-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?", froms[0])
    assert m, f"{name}: base {froms[0]!r} is not pinned to python:3.11.N-slim-<suite>"
    # The project's own Python requirement agrees.
    assert project()["requires-python"] == ">=3.11,<3.12"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_runs_as_a_non_root_user(name: str) -> None:
    users = [a for i, a in instructions(DOCKERFILES[name]) if i == "USER"]
    assert users, f"{name}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"{name}: final USER {users[-1]}"
    # ... and the manifests agree: same uid where non-root, root only for the agent.
    objs = render("base")
    if name == "extender":
        spec = pod_spec(one(objs, "Deployment", "copack-extender"))
        assert str(spec["securityContext"]["runAsUser"]) == uid


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copies_exist_and_dependencies_come_from_the_lock(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    for i, args in steps:
        if i == "COPY" and not args.startswith("--from"):
            *sources, _dest = shlex.split(args)
            for s in sources:
                assert (REPO / s).exists(), f"{name}: COPY {s}: no such path"
    runs = " && ".join(a for i, a in steps if i == "RUN")
    assert "pip install --no-deps -r /tmp/requirements.lock -r /tmp/build-requirements.lock" in runs
    # No build isolation: it would fetch setuptools/wheel unpinned at build time.
    assert "pip install --no-deps --no-build-isolation ." in runs
    assert "pip check" in runs
    copied = {shlex.split(a)[0] for i, a in steps if i == "COPY"}
    # Every package directory the wheel includes is copied in.
    packages = project_packages()
    assert packages <= {c.rstrip("/") for c in copied}, packages - copied


def project_packages() -> set[str]:
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    return {p.rstrip("*") for p in include}


@pytest.mark.parametrize(("name", "command"), [("extender", ["extender", "serve"]),
                                               ("agent", ["agent", "run"])])
def test_entrypoint_is_the_copack_script_and_matches_the_manifests(name, command) -> None:
    steps = dict(instructions(DOCKERFILES[name]))
    assert json.loads(steps["ENTRYPOINT"]) == ["copack"]
    assert project()["scripts"]["copack"] == "copack.cli:main"
    assert json.loads(steps["CMD"])[:2] == command
    kind, wl = ("Deployment", "copack-extender") if name == "extender" else (
        "DaemonSet", "copack-agent")
    (c,) = pod_spec(one(render("base"), kind, wl))["containers"]
    assert c["args"][:2] == command
    assert c["image"].startswith(f"ghcr.io/copack/{name}:")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerignore_sends_only_what_the_build_copies(name: str) -> None:
    ignore = (IMAGES / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*"  # everything excluded first...
    allowed = {line[1:].removesuffix("/**") for line in ignore if line.startswith("!")}
    copied = {shlex.split(a)[0] for i, a in instructions(DOCKERFILES[name]) if i == "COPY"}
    assert copied <= allowed, copied - allowed  # ...then exactly what COPY needs


def test_lock_pins_every_runtime_dependency_at_an_accepted_version() -> None:
    pins = lock_pins()
    for spec in project()["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not in requirements.lock: " \
                             "rerun deploy/images/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, pyproject wants {req.specifier}"
        )


def test_build_lock_covers_the_build_system_and_does_not_repeat_a_runtime_pin() -> None:
    build, runtime = lock_pins(BUILD_LOCK), lock_pins()
    assert not set(build) & set(runtime), set(build) & set(runtime)  # pip refuses doubles
    both = {**runtime, **build}
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for spec in requires:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in both, f"build requirement {req.name} is not pinned: rerun lock.sh"
        assert req.specifier.contains(both[name]), (req, both[name])


def test_lock_holds_no_dev_tool() -> None:
    pins = lock_pins()
    dev = {canonicalize_name(Requirement(s).name)
           for s in project()["optional-dependencies"]["dev"]}
    assert not dev & set(pins), dev & set(pins)
    assert canonicalize_name("copack") not in pins


def test_lock_is_closed_where_the_installed_metadata_can_tell() -> None:
    """For each pinned package installed here at the same version, its own requirements
    (for Linux, CPython 3.11, no extras) are pinned too."""
    pins = lock_pins()
    env = {"sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11",
           "python_full_version": "3.11.14", "implementation_name": "cpython",
           "platform_machine": "x86_64", "platform_python_implementation": "CPython",
           "os_name": "posix", "extra": ""}
    checked = 0
    for name, version in pins.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            assert canonicalize_name(req.name) in pins, (
                f"{name}=={version} requires {req} which requirements.lock does not pin"
            )
    assert checked >= 10  # enough of the lock matches this environment to mean something
