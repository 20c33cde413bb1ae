"""Where a result came from: the code (commit, dirty flag, a hash of the sources), torch, CUDA, the CPU's float
kernels, the libraries whose internals the numbers rest on, and how the installed packages differ from the lock
(constraints.txt, :mod:`distill.lock`). ``python -m distill.env`` prints it (what a bug report needs); run
directories (:mod:`distill.identity`) and the tables under docs/ (:mod:`distill.provenance`) record it.

Two runs with the same config and seed give the same numbers on one CPU with the same code and torch; the CPU
capability (ATen's dispatch level: AVX512, AVX2, DEFAULT...) picks the float kernels, so it is recorded too.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/
REPO_ROOT = PACKAGE_ROOT.parent  # the checkout (when installed from one)
# the libraries whose internals the project's exactness rests on (schedulers, attention, tokenisation, configs)
LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "diffusers",
    "transformers",
    "hydra-core",
    "omegaconf",
    "torchmetrics",
    "open-clip-torch",
    "peft",
    "gsplat",
    "wandb",
    "submitit",
)


def package_version() -> str:
    try:
        return importlib.metadata.version("sdi-lab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _git(*args: str) -> str | None:
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any]:
    """{"commit": sha or None, "dirty": bool or None}: None where the code is not a git checkout.
    ``dirty`` counts tracked files under src/ and conf/ (what a run's result can depend on)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "src", "conf")
    return {"commit": commit, "dirty": bool(status)}


def _source_files() -> list[Path]:
    roots = [PACKAGE_ROOT / "distill", PACKAGE_ROOT / "eval"]
    conf = REPO_ROOT / "conf"
    files = [p for r in roots for p in r.rglob("*.py")]
    if conf.is_dir():
        files += [p for p in conf.rglob("*.yaml")]
    return sorted(p for p in files if "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 (first 16 hex digits) of the project's Python sources and YAML configs, by relative path and content:
    the code identity of a run whether or not it comes from a git checkout, and whether or not the tree is dirty."""
    h = hashlib.sha256()
    for p in _source_files():
        rel = p.relative_to(REPO_ROOT if p.is_relative_to(REPO_ROOT) else PACKAGE_ROOT)
        h.update(str(rel).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """What code ran: package version, git commit and dirty flag (None outside a checkout), source hash."""
    return {"version": package_version(), **git_state(), "source_hash": source_hash()}


def cpu_capability() -> str:
    """ATen's CPU dispatch level (AVX512, AVX2, DEFAULT, ...): which float kernels this process uses."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        return os.environ.get("ATEN_CPU_CAPABILITY", "unknown")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


@functools.lru_cache(maxsize=1)
def lock_status() -> dict[str, Any]:
    """How the installed packages compare with the lock (:mod:`distill.lock`, constraints.txt): ``{"file": path,
    "mismatches": [one line each]}``; ``file`` None where there is no lock (not a checkout), ``error`` where it
    cannot be read."""
    from distill import lock

    if not lock.LOCK_FILE.exists():
        return {"file": None, "mismatches": []}
    try:
        return {"file": str(lock.LOCK_FILE), "mismatches": lock.mismatches(lock.read_lock(lock.LOCK_FILE))}
    except (OSError, lock.LockError) as e:
        return {"file": str(lock.LOCK_FILE), "mismatches": [], "error": str(e)}


def numerics() -> dict[str, Any]:
    """What decides the float results of a computation on this machine: torch, CUDA, the CPU's kernels."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "cpu_capability": cpu_capability(),
        "cpu": cpu_name(),
    }


def environment() -> dict[str, Any]:
    """Everything above in one dict (the run directory's ``environment.json``, ``python -m distill.env``)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "code": code_version(),
        **numerics(),
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "lock": lock_status(),
    }


def stamp(env: dict[str, Any] | None = None) -> str:
    """One line for the head of a results table: commit (+dirty), torch, CPU capability and model, date."""
    import datetime

    env = env or environment()
    code = env["code"]
    commit = (code.get("commit") or "no-git")[:10] + ("+dirty" if code.get("dirty") else "")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return (
        f"commit {commit} (sources {code['source_hash']}), torch {env['torch']}, CPU {env['cpu_capability']} "
        f"({env['cpu']}), {date}"
    )


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m distill.env", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the whole record as JSON (default: one line a key)")
    args = ap.parse_args(argv)
    env = environment()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    code = env["code"]
    print(f"sdi-lab {code['version']}  commit {code['commit']}{' (dirty)' if code['dirty'] else ''}")
    print(f"sources {code['source_hash']}")
    for k in ("torch", "cuda", "cpu_capability", "cpu", "gpu", "python", "platform"):
        print(f"{k:15s} {env[k]}")
    for k, v in env["libraries"].items():
        print(f"{k:15s} {v if v is not None else '-'}")
    lk = env["lock"]
    if lk["file"] is None:
        print(f"{'lock':15s} no constraints.txt beside the code (not a checkout): versions not compared")
    elif lk.get("error"):
        print(f"{'lock':15s} {lk['error']}")
    elif not lk["mismatches"]:
        print(f"{'lock':15s} every installed package matches {lk['file']}")
    else:
        print(f"{'lock':15s} {len(lk['mismatches'])} differences from {lk['file']}:")
        print("\n".join(f"{'':15s} {m}" for m in lk["mismatches"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
