"""The lock (constraints.txt, :mod:`distill.lock`): the installed versions are the locked ones, the lock covers and
satisfies pyproject.toml, and the README's commands and CI install through it.

The two environment checks (every installed version == the lock; ``pip check``) fail in CI (the env var ``CI`` set,
as .ci/run does) and skip outside it with the differences as the reason (``pytest -rs`` shows them): a developer's
own environment may hold other versions on purpose, CI's fresh install must not.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from distill import lock

ROOT = Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))


def _fail_in_ci(problem: str) -> None:
    if IN_CI:
        pytest.fail(problem)
    pytest.skip(f"not in CI (CI unset), so not a failure here: {problem}")


def test_installed_versions_are_the_locked_ones():
    bad = lock.mismatches(lock.read_lock())
    if bad:
        _fail_in_ci(
            f"{len(bad)} installed packages differ from {lock.LOCK_FILE} (install with `pip install -c "
            f"constraints.txt ...`, or re-resolve with scripts/update-lock): " + "; ".join(bad)
        )


def test_pip_check():
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        _fail_in_ci(f"pip check: {(r.stdout + r.stderr).strip()}")


def test_mismatches_name_every_difference():
    present = lock.installed()
    locked = dict(lock.read_lock())
    # the real installed set compared with an altered copy of the lock: each alteration is reported, nothing else
    locked_now = {n: present[n] for n in locked if n in present}
    locked_now["numpy"] = "0.0.1"
    del locked_now["scipy"]
    extra = {**present, "sdi-lab": "9.9", "pip": "1.0"}  # never compared
    out = lock.mismatches({**locked_now, "not-installed-pkg": "1.0"}, extra)
    unlocked = sorted(n for n in present if n not in locked and n not in lock.UNLOCKED)
    assert f"numpy {present['numpy']} is installed, the lock has 0.0.1" in out
    assert f"scipy {present['scipy']} is installed but not in the lock" in out
    assert len(out) == 2 + len(unlocked)
    assert not any("sdi-lab" in m or m.startswith("pip ") or "not-installed-pkg" in m for m in out)


def test_read_lock_and_diff(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("# header\nOpen_Clip.torch==3.3.0\nnumpy==2.4.6  # comment\n\nscipy==1.17.1\n")
    new = tmp_path / "new.txt"
    new.write_text("open-clip-torch==3.4.0\nnumpy==2.4.6\ntorch==2.14.1\n")
    a, b = lock.read_lock(old), lock.read_lock(new)
    assert a == {"open-clip-torch": "3.3.0", "numpy": "2.4.6", "scipy": "1.17.1"}
    assert lock.diff(a, b) == ["  open-clip-torch 3.3.0 -> 3.4.0", "- scipy 1.17.1", "+ torch 2.14.1"]
    bad = tmp_path / "bad.txt"
    bad.write_text("numpy>=2\n")
    with pytest.raises(lock.LockError, match="numpy>=2"):
        lock.read_lock(bad)
    r = subprocess.run(
        [sys.executable, "-m", "distill.lock", "check", "--lock", str(bad)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 2 and "not name==version" in r.stderr and "Traceback" not in r.stderr


def _pyproject_requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11 (the lock's Python)")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*meta["dependencies"], *meta["optional-dependencies"]["dev"]]]


def test_the_lock_covers_and_satisfies_pyproject():
    """Every direct dependency of the default and dev installs is locked at a version inside pyproject.toml's range
    (so the ranges admit what was tested, and the lock is not stale after a dependency was added)."""
    locked = lock.read_lock()
    for req in _pyproject_requirements():
        name = lock.normalize(req.name)
        assert name in locked, f"{req.name} (pyproject.toml) is not in constraints.txt: run scripts/update-lock"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt has {name}=={locked[name]}, outside pyproject.toml's {req}"
        )
    assert "sdi-lab" not in locked and "pip" not in locked


def _readme_quickstart() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [" ".join(b.replace("\\\n", " ").split()) for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_and_ci_install_through_the_lock():
    cmds = _readme_quickstart()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("python train.py experiment=gaussians_sdi") and cmds[1].endswith("python -m pytest")
    for c in cmds:
        install = re.search(r"pip install ([^&]*)", c).group(1).split()
        assert install[:2] == ["-c", "constraints.txt"], c
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if re.match(r"\s*pip install", ln)]
    assert ci and all("-c constraints.txt" in ln for ln in ci), ci
    assert re.search(r"^export CI=", (ROOT / ".ci" / "run").read_text(), re.M)


def test_env_lists_the_differences_from_the_lock(tmp_path):
    """``python -m distill.env`` compares with the lock it is given (SDI_LOCK_FILE): one altered version is listed."""
    present = lock.installed()
    altered = tmp_path / "constraints.txt"
    pins = {n: v for n, v in present.items() if n not in lock.UNLOCKED}
    pins["numpy"] = "0.0.1"
    altered.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    env = {**os.environ, "SDI_LOCK_FILE": str(altered), "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-m", "distill.env"], capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 0, r.stderr
    assert f"1 differences from {altered}" in r.stdout
    assert f"numpy {present['numpy']} is installed, the lock has 0.0.1" in r.stdout
