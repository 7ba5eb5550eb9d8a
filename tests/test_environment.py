"""pyproject.toml (ranges), requirements.lock (exact, CPU) and environment.yml (exact, GPU) must
name the same packages, and the pins must satisfy the ranges, so the course does not drift."""

import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[1]


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_name(r.name): r for r in map(Requirement, reqs)}


def _no_deps() -> dict[str, Requirement]:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ldm_lib"]
    return {_name(r.name): r for r in map(Requirement, tool["no-deps"])}


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[_name(name)] = version.strip()
    return pins


def _lock() -> dict[str, str]:
    return _pins((ROOT / "requirements.lock").read_text().splitlines())


def _environment() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return _pins(p for p in pip if not p.startswith("-"))


def test_lock_pins_every_dependency_within_its_range():
    lock = _lock()
    for name, req in {**_pyproject(), **_no_deps()}.items():
        assert name in lock, f"{name} is in pyproject.toml but not in requirements.lock (run make lock)"
        assert req.specifier.contains(Version(lock[name]), prereleases=True), (
            f"requirements.lock pins {name}=={lock[name]}, outside pyproject's range {req.specifier}"
        )


def test_environment_yml_names_the_same_packages_at_the_same_versions():
    env, lock, direct = _environment(), _lock(), _pyproject()
    assert set(env) == set(direct), (
        f"environment.yml and pyproject.toml differ: only in environment.yml {set(env) - set(direct)}, "
        f"only in pyproject.toml {set(direct) - set(env)}"
    )
    for name, version in env.items():
        assert lock[name] == version, (
            f"{name}: environment.yml pins {version}, requirements.lock {lock[name]}"
        )


def test_no_deps_packages_are_installed_without_their_requirements():
    # The lock is the full closure, installed with --no-deps; conda users get the same by hand.
    assert "--no-deps -r requirements.lock" in (ROOT / "Makefile").read_text()
    for name in _no_deps():
        assert f"--no-deps {name}=={_lock()[name]}" in (ROOT / "environment.yml").read_text()
        assert f"--no-deps {name}=={_lock()[name]}" in (ROOT / "README.md").read_text()


def test_torch_is_pinned_exactly():
    # A loose torch would pull a multi-GB CUDA build on CPU machines.
    assert re.fullmatch(r"\d+\.\d+\.\d+", _lock()["torch"])
    assert "torch==" in (ROOT / "Makefile").read_text() or "TORCH_PIN" in (ROOT / "Makefile").read_text()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make course" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
