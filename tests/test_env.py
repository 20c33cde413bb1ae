"""``distill.env``: what a result came from. The commit against git itself, the dirty flag and the source hash on a
throw-away checkout, the CPU capability against the kernels ATen is told to use, the CLI's JSON against
importlib.metadata."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distill import env

ROOT = Path(__file__).resolve().parents[1]
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo: Path, *args: str) -> str:
    e = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    e["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=e).stdout


@needs_git
def test_commit_is_the_checkouts_head():
    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout")
    assert env.git_state()["commit"] == _git(ROOT, "rev-parse", "HEAD").strip()


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A throw-away checkout holding a copy of the sources and configs, with env's roots pointed at it."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src" / "distill", repo / "src" / "distill", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src" / "eval", repo / "src" / "eval", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", repo / "conf", symlinks=True)
    (repo / "README.md").write_text("readme\n")
    monkeypatch.setattr(env, "REPO_ROOT", repo)
    monkeypatch.setattr(env, "PACKAGE_ROOT", repo / "src")
    return repo


@needs_git
def test_dirty_flag_counts_tracked_sources_and_configs(checkout):
    state = env.git_state.__wrapped__  # uncached: the module's cached value belongs to the real checkout
    assert state() == {"commit": None, "dirty": None}  # not a checkout yet
    _git(checkout, "init", "-q")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "-q", "-m", "start")
    head = _git(checkout, "rev-parse", "HEAD").strip()
    assert state() == {"commit": head, "dirty": False}
    (checkout / "README.md").write_text("changed\n")  # outside src/ and conf/: cannot change a result
    (checkout / "src" / "distill" / "new_untracked.py").write_text("x = 1\n")
    assert state()["dirty"] is False
    yaml = checkout / "conf" / "train.yaml"
    yaml.write_text(yaml.read_text() + "\n# edited\n")
    assert state() == {"commit": head, "dirty": True}


def test_source_hash_follows_the_sources_and_configs(checkout):
    h = env.source_hash.__wrapped__
    base = h()
    assert base == h() and len(base) == 16
    (checkout / "README.md").write_text("changed\n")
    (checkout / "src" / "distill" / "__pycache__").mkdir(exist_ok=True)
    (checkout / "src" / "distill" / "__pycache__" / "x.py").write_text("cache\n")
    assert h() == base
    yaml = checkout / "conf" / "train.yaml"
    yaml.write_text(yaml.read_text() + "\n# edited\n")
    edited = h()
    assert edited != base
    py = checkout / "src" / "eval" / "__init__.py"
    py.write_text(py.read_text() + "\n")
    assert h() not in (base, edited)


def _env_json(**extra: str) -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **extra}
    r = subprocess.run(
        [sys.executable, "-m", "distill.env", "--json"], capture_output=True, text=True, env=e, check=False
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_cli_json_reports_the_kernels_and_versions_in_use():
    rec = _env_json(ATEN_CPU_CAPABILITY="default")  # ATen told to use its plain kernels
    assert rec["cpu_capability"] == "DEFAULT"
    for name, version in rec["libraries"].items():
        try:
            assert version == importlib.metadata.version(name), name
        except importlib.metadata.PackageNotFoundError:
            assert version is None, name
    assert rec["torch"].split("+")[0] == importlib.metadata.version("torch")
    assert set(rec["lock"]) >= {"file", "mismatches"}
    assert rec["code"]["source_hash"] == env.source_hash()
