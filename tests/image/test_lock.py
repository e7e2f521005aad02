"""requirements.lock pins every runtime dependency; the Dockerfile and build-rootfs agree.

Fast and unprivileged (no build): these run everywhere the test suite runs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import ModuleType

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
# The environment the image's Python evaluates markers in (Debian bookworm, CPython 3.11, x86_64).
IMAGE_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}


def lock_pins(image_dir: Path) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (image_dir / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-z0-9-]+)==(\S+)", line)
        assert m, f"requirements.lock: not a normalized `name==version` line: {line!r}"
        name = m.group(1)
        assert name == canonicalize_name(name), f"{name}: not a normalized name"
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(m.group(2))
    return pins


def runtime_requirements(build_script: ModuleType) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"][build_script.IMAGE_EXTRA]
    return [Requirement(r) for r in [*project["dependencies"], *extra]]


def test_every_runtime_dependency_is_pinned_within_its_specifier(image_dir, build_script) -> None:
    pins = lock_pins(image_dir)
    problems = []
    for req in runtime_requirements(build_script):
        env = {**IMAGE_ENV, "extra": ""}
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req}: not in requirements.lock")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req}: locked at {pins[name]}")
    assert not problems, (
        "requirements.lock is out of date with pyproject.toml (regenerate: manifests/image/build-rootfs --lock):\n"
        + "\n".join(problems)
    )


def test_lock_is_torch_free_and_sorted(image_dir) -> None:
    pins = lock_pins(image_dir)
    heavy = sorted(
        n
        for n in pins
        if n in {"torch", "sentence-transformers", "transformers", "triton"} or n.startswith("nvidia-")
    )
    assert not heavy, f"the image must not install {heavy}"
    assert list(pins) == sorted(pins)


def test_no_deps_packages_are_pinned_and_declared(image_dir, build_script) -> None:
    text = (image_dir / "requirements.lock").read_text()
    declared = set(re.findall(r"^# no-deps: (\S+)", text, flags=re.MULTILINE))
    assert declared == set(build_script.NO_DEPS)
    pins = lock_pins(image_dir)
    assert declared <= set(pins)


def test_dockerfile_final_stage_config(build_script) -> None:
    config = build_script.dockerfile_config("1.2.3")
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["tollway"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].split(":")[0] == "/opt/tollway/bin"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == env["TMPDIR"] == "/tmp"
    assert config["Labels"]["org.opencontainers.image.version"] == "1.2.3"
    assert build_script.dockerfile_suite() == "bookworm"


def test_shared_scripts_agree_on_the_user(image_dir) -> None:
    setup = (image_dir / "rootfs-setup").read_text()
    assert re.search(r"^APP_UID=65532$", setup, flags=re.MULTILINE)
    assert "ca-certificates" in setup and "python3" in setup


def test_docker_context_matches_the_source_copy(image_dir, build_script) -> None:
    """Dockerfile.dockerignore leaves out what build-rootfs leaves out, and keeps what the Dockerfile uses."""
    patterns = [
        line.strip()
        for line in (image_dir / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    excluded_top = {p for p in patterns if "/" not in p and "*" not in p and not p.startswith("!")}
    assert set(build_script.SOURCE_EXCLUDE) <= excluded_top
    dockerfile = (image_dir / "Dockerfile").read_text()
    used = {f"manifests/image/{name}" for name in re.findall(r"sh /mnt/([\w.-]+)", dockerfile)}
    used |= set(re.findall(r"COPY (manifests/image/[\w.-]+)", dockerfile))
    assert used, "the Dockerfile uses no file from manifests/image?"
    reincluded = {p[1:] for p in patterns if p.startswith("!")}
    assert used <= reincluded, f"not in the Docker context: {sorted(used - reincluded)}"
    for rel in used:
        assert (ROOT / rel).is_file(), rel


def test_workflow_tags_the_package_version() -> None:
    workflow = (ROOT / ".github" / "workflows" / "image.yml").read_text()
    assert "manifests/image/Dockerfile" in workflow
    assert "ghcr.io/" in workflow
    # The tag must equal pyproject's version; the workflow checks that rather than trusting the git tag.
    assert "pyproject.toml" in workflow
    jobs = yaml.safe_load(workflow)["jobs"]
    assert jobs, "no jobs"
