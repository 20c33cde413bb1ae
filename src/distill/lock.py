"""The lock: ``constraints.txt`` at the repository root holds the exact version of every package (direct and
transitive) of the default and ``dev`` installs that the tests passed with on the CPU machines. The README's two
commands and ``.ci/run`` install through it (``pip install -c constraints.txt ...``); ``scripts/update-lock``
re-resolves it to the newest versions that ``pyproject.toml``'s ranges allow.

This module reads the lock, compares it with what is installed in the running interpreter (``importlib.metadata``),
and diffs two locks: ``python -m distill.lock check`` lists the mismatches (exit code 1 when there are any),
``python -m distill.lock diff OLD NEW`` prints the version changes between two lock files. ``SDI_LOCK_FILE`` names
another lock than the checkout's constraints.txt.

Names are compared in PEP 503 normal form (``Open_CLIP-torch`` == ``open-clip-torch``). The project itself
(``sdi-lab``) and ``pip`` are never locked: pip is the installer, not a dependency.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# SDI_LOCK_FILE: another lock to compare with (scripts/update-lock runs the tests against the lock it resolved)
LOCK_FILE = Path(os.environ.get("SDI_LOCK_FILE") or REPO_ROOT / "constraints.txt")
# installed in every environment but not part of the lock: the project and its installer
UNLOCKED = frozenset({"sdi-lab", "pip"})


class LockError(ValueError):
    """A lock file line that is not ``name==version`` (the only form the lock holds)."""


def normalize(name: str) -> str:
    """PEP 503 normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """{normalised name: version} of a lock file of ``name==version`` lines (comments and blank lines skipped)."""
    out: dict[str, str] = {}
    for i, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m is None:
            raise LockError(f"{path}:{i}: {raw!r} is not name==version (the lock pins exact versions only)")
        out[normalize(m.group(1))] = m.group(2)
    return out


def installed() -> dict[str, str]:
    """{normalised name: version} of every distribution importable by this interpreter (first one on sys.path wins,
    as for imports)."""
    out: dict[str, str] = {}
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"]
        if name:
            out.setdefault(normalize(name), d.version)
    return out


def mismatches(lock: dict[str, str], present: dict[str, str] | None = None) -> list[str]:
    """One line per installed package whose version differs from the lock or that the lock does not hold.

    A locked package that is not installed is fine (the default install has no ``dev`` tools); ``sdi-lab`` and
    ``pip`` are not compared."""
    present = installed() if present is None else present
    out = []
    for name, version in sorted(present.items()):
        if name in UNLOCKED:
            continue
        if name not in lock:
            out.append(f"{name} {version} is installed but not in the lock")
        elif lock[name] != version:
            out.append(f"{name} {version} is installed, the lock has {lock[name]}")
    return out


def diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The version changes from ``old`` to ``new``: ``name old -> new``, ``+ name version``, ``- name version``."""
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            out.append(f"+ {name} {b}")
        elif b is None:
            out.append(f"- {name} {a}")
        else:
            out.append(f"  {name} {a} -> {b}")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m distill.lock", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="list the installed packages whose version differs from the lock")
    c.add_argument("--lock", type=Path, default=LOCK_FILE)
    d = sub.add_parser("diff", help="the version changes between two lock files")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "diff":
            lines = diff(read_lock(a.old), read_lock(a.new))
            print("\n".join(lines) if lines else "no version changes")
            return 0
        lines = mismatches(read_lock(a.lock))
    except (OSError, LockError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if lines:
        print(f"{len(lines)} mismatches with {a.lock}:\n" + "\n".join(lines))
        return 1
    print(f"every installed package matches {a.lock}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
