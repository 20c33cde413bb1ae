"""Where each results table under docs/ came from, and whether the code it depends on changed since.

``TABLES`` is the registry: every table that ``python -m distill.reproduce ...`` writes under docs/, with the
command that writes it and the files it depends on (the code and configs whose values enter its numbers: the loop,
the method, the prior, the scene and their YAMLs; bookkeeping such as run directories, logging, the CLI or the sweep
evaluator is left out). Each table has a machine-readable record beside it, ``docs/<stem>.provenance.json``:
the producing command, :func:`distill.env.environment` at production (commit + dirty flag, source hash, torch,
CUDA, CPU capability and model, library versions) and the date; the table's .md starts with the same as one line
(:func:`stamp_line`). The producers call :func:`record`.

A table is *stale* when a commit after its recorded one changed a file it depends on (``git log <commit>..HEAD --
<depends>``). ``tests/test_provenance.py`` fails on a stale table unless its record declares it from an earlier
commit with a one-line reason (``earlier_commit``), and the README / docs show that reason where they cite the table.
``python -m distill.provenance`` lists every table's commit and staleness; ``python -m distill.provenance
mark-earlier <stem> "<reason>"`` declares one (and rewrites the stamp line of its .md).
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
STAMP_PREFIX = "Produced at "
EARLIER = "**From an earlier commit:**"


@dataclass(frozen=True)
class Table:
    """One results table: the files its command writes (under docs/), the command, and what its numbers depend on
    (paths relative to the repository root; a directory stands for every file below it)."""

    stem: str
    files: tuple[str, ...]
    command: str
    depends: tuple[str, ...]


_S = "src/distill/"
# the training loop and what every method run goes through (config typing, prompts, schedules, kappa, DDIM)
_LOOP = (
    _S + "train.py",
    _S + "config.py",
    _S + "guidance.py",
    _S + "kappa.py",
    _S + "ddim.py",
    _S + "schedule.py",
    _S + "prompts.py",
    _S + "losses.py",
    _S + "images.py",
    _S + "methods/__init__.py",
    _S + "priors/base.py",
    _S + "scene/cameras.py",
    _S + "reproduce/common.py",
    "conf/train.yaml",
    "conf/guidance/ddim_inversion.yaml",
    "conf/guidance/sds.yaml",
    "conf/kappa",
    "conf/cfg",
    "conf/inversion",
    "conf/schedule",
    "conf/camera",
)
_2D = (_S + "priors/analytic.py", _S + "scene/image.py", "conf/prior/analytic.yaml", "conf/scene/image.yaml")
_3D = (
    _S + "priors/analytic3d.py",
    _S + "priors/analytic3d_metrics.py",
    _S + "priors/sdf_objects.py",
    "conf/prior/analytic3d.yaml",
)
_NERF = (
    _S + "scene/nerf.py",
    _S + "scene/hashgrid.py",
    _S + "scene/renderer.py",
    "conf/scene/nerf_cpu.yaml",
)
_GAUSSIANS = (
    *_NERF,  # GaussianScene shares the NeRF's loss weights
    _S + "scene/gaussians.py",
    _S + "scene/rasterizer.py",
    _S + "scene/densify.py",
    "conf/scene/gaussians.yaml",
    "conf/experiment/gaussians_sdi.yaml",
)
_NOTEBOOK_2D = tuple(
    f"conf/experiment/{n}.yaml"
    for n in ("sdi_2d", "sds_2d", "sdi_notebook_2d", "sds_notebook_2d", "cached_notebook_2d")
)
_ISM = (_S + "methods/ism.py", "conf/guidance/ism.yaml", "conf/experiment/sdi_2d.yaml")


def _files(stem: str, *ext: str) -> tuple[str, ...]:
    return tuple(f"docs/{stem}.{e}" for e in ext)


TABLES: dict[str, Table] = {
    t.stem: t
    for t in (
        Table(
            "fig2_1",
            _files("fig2_1", "md", "csv", "png"),
            "python -m distill.reproduce fig2_1",
            (*_LOOP, *_2D, *_NOTEBOOK_2D, _S + "reproduce/fig2_1.py"),
        ),
        Table(
            "kappa_study",
            _files("kappa_study", "csv", "png"),
            "python -m distill.reproduce kappa_study",
            (
                _S + "guidance.py",
                _S + "kappa.py",
                _S + "ddim.py",
                _S + "prompts.py",
                _S + "priors/base.py",
                _S + "reproduce/kappa_study.py",
                *_2D,
                "conf/experiment/sdi_2d.yaml",
            ),
        ),
        Table(
            "main_job_seeds",
            _files("main_job_seeds", "md", "csv", "png"),
            "python -m distill.reproduce main_job --seeds 5 --set trainer.threads=1",
            (*_LOOP, *_3D, *_NERF, _S + "reproduce/main_job.py"),
        ),
        Table(
            "main_job_gaussians_seeds",
            _files("main_job_gaussians_seeds", "md", "csv", "png"),
            "python -m distill.reproduce main_job --seeds 10 --set experiment=gaussians_sdi --set trainer.threads=1 "
            "--runs outputs/reproduce/main_job_gaussians --name main_job_gaussians_seeds",
            (*_LOOP, *_3D, *_GAUSSIANS, _S + "reproduce/main_job.py"),
        ),
        Table(
            "ism_study_2d",
            _files("ism_study_2d", "md", "csv", "png"),
            "python -m distill.reproduce ism_study --seeds 5 --steps 500 --only 2d",
            (*_LOOP, *_2D, *_ISM, _S + "reproduce/ism_study.py"),
        ),
        Table(
            "ism_study_3d",
            _files("ism_study_3d", "md", "csv", "png"),
            "python -m distill.reproduce ism_study --seeds 5 --steps-3d 100 --size-3d 32 --only 3d",
            (*_LOOP, *_3D, *_NERF, *_ISM, _S + "reproduce/ism_study.py"),
        ),
    )
}


def record_path(stem: str, docs: Path = DOCS) -> Path:
    return docs / f"{stem}.provenance.json"


def stamp_line(rec: dict[str, Any]) -> str:
    """The first line of a table's .md: where it was produced (from its record), and the earlier-commit note if
    it has one."""
    p = rec["produced"]
    commit = (p.get("commit") or "no-git")[:10] + ("+dirty" if p.get("dirty") else "")
    cap = p.get("cpu_capability") or "not recorded"
    cpu = f" ({p['cpu']})" if p.get("cpu") else ""
    sources = f" (sources {p['source_hash']})" if p.get("source_hash") else ""
    line = (
        f"{STAMP_PREFIX}commit {commit}{sources}, torch {p.get('torch') or 'not recorded'}, CPU capability {cap}{cpu}, "
        f"{p['date']} (record: {rec['table']}.provenance.json; another CPU or torch gives other trajectories)."
    )
    if p.get("reconstructed") or str(p.get("note", "")).startswith("recorded afterwards"):
        # a table from before the records, its provenance reconstructed from git log
        line += " Recorded afterwards from git log (the record's note says how)."
    elif p.get("note"):
        line += f" {p['note'][0].upper()}{p['note'][1:]}."
    if rec.get("earlier_commit"):
        line += f" {EARLIER} {rec['earlier_commit']}"
    return line


def produced() -> dict[str, Any]:
    """Where a result is being produced: :func:`distill.env.environment` (commit + dirty flag, source hash, torch,
    CUDA, CPU capability and model, library versions, lock differences) flattened, with the date (UTC). The
    benchmarks put it into their JSON as ``produced``."""
    from distill.env import environment

    env = environment()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {**env.pop("code"), "date": date, **env}


def record(out: Path, stem: str, command: str, files: list[str] | None = None, at: dict[str, Any] | None = None) -> str:
    """Write ``out/<stem>.provenance.json`` for a table produced by this process and return its stamp line for the
    head of the .md. ``at``: :func:`produced` taken when the study started (a commit made while it ran is not the
    code that ran); default now. A new record has no earlier-commit note."""
    reg = TABLES.get(stem)
    rec = {
        "table": stem,
        "command": command,
        "files": files if files is not None else [Path(f).name for f in (reg.files if reg else ())],
        "produced": at if at is not None else produced(),
        "earlier_commit": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    record_path(stem, out).write_text(json.dumps(rec, indent=2) + "\n")
    return stamp_line(rec)


def read_record(stem: str, docs: Path = DOCS) -> dict[str, Any]:
    return json.loads(record_path(stem, docs).read_text())


def with_stamp(md: str, line: str) -> str:
    """``md`` with its stamp line replaced by (or, if it has none, preceded by) ``line``."""
    lines = md.splitlines()
    if lines and lines[0].startswith(STAMP_PREFIX):
        lines = lines[2:] if len(lines) > 1 and not lines[1].strip() else lines[1:]
    return "\n".join([line, "", *lines]) + "\n"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)


class NoHistory(RuntimeError):
    """git cannot say: no repository, or the recorded commit is not in this clone's history (shallow clone)."""


def changes_since(commit: str, depends: tuple[str, ...], root: Path = REPO_ROOT) -> list[str]:
    """``<short sha> <subject>`` of each commit after ``commit`` (up to HEAD) that changed one of ``depends``,
    newest first. Raises :class:`NoHistory` when git cannot tell."""
    if not (root / ".git").exists():
        raise NoHistory(f"{root} is not a git checkout")
    if _git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise NoHistory(f"commit {commit} is not in this clone's history (a shallow clone? git fetch --unshallow)")
    r = _git(root, "log", "--format=%h %s", f"{commit}..HEAD", "--", *depends)
    if r.returncode != 0:
        raise NoHistory(f"git log failed: {r.stderr.strip()}")
    return [ln for ln in r.stdout.splitlines() if ln.strip()]


def status(docs: Path = DOCS, root: Path = REPO_ROOT) -> list[dict[str, Any]]:
    """Each registered table: its recorded commit, the commits since that changed its dependencies (None when git
    cannot tell, with the reason), and its earlier-commit note."""
    out = []
    for stem, t in TABLES.items():
        rec = read_record(stem, docs) if record_path(stem, docs).exists() else None
        row: dict[str, Any] = {"table": stem, "record": rec is not None}
        if rec is not None:
            row["commit"] = rec["produced"].get("commit")
            row["earlier_commit"] = rec.get("earlier_commit")
            try:
                row["changes"] = changes_since(row["commit"] or "", t.depends, root)
            except NoHistory as e:
                row["changes"], row["no_history"] = None, str(e)
        out.append(row)
    return out


def mark_earlier(stem: str, reason: str, docs: Path = DOCS) -> None:
    """Declare ``stem`` from an earlier commit with a one-line ``reason`` (record and stamp line of its .md)."""
    if "\n" in reason or not reason.strip():
        raise ValueError(f"the reason must be one non-empty line, got {reason!r}")
    rec = read_record(stem, docs)
    rec["earlier_commit"] = reason.strip()
    record_path(stem, docs).write_text(json.dumps(rec, indent=2) + "\n")
    md = docs / f"{stem}.md"
    if md.exists():
        md.write_text(with_stamp(md.read_text(), stamp_line(rec)))


def paragraphs_citing(text: str, stem: str) -> list[str]:
    """The paragraphs of a markdown text (outside fenced code blocks) that name one of the table's files
    (``<stem>.md`` / ``.csv`` / ``.png`` / ``.*``), whitespace collapsed."""
    text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
    pat = re.compile(rf"(?<![\w/]){re.escape(stem)}\.(md|csv|png|\*)|docs/{re.escape(stem)}\.(md|csv|png|\*)")
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if pat.search(p)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m distill.provenance", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    m = sub.add_parser("mark-earlier", help="declare a table from an earlier commit with a one-line reason")
    m.add_argument("stem", choices=sorted(TABLES))
    m.add_argument("reason")
    a = ap.parse_args(argv)
    if a.cmd == "mark-earlier":
        try:
            mark_earlier(a.stem, a.reason)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{a.stem}: {stamp_line(read_record(a.stem))}")
        return 0
    for row in status():
        if not row["record"]:
            print(f"{row['table']}: no record ({row['table']}.provenance.json); run: {TABLES[row['table']].command}")
            continue
        head = f"{row['table']}: commit {(row['commit'] or 'none')[:10]}"
        if row["changes"] is None:
            print(f"{head}; cannot tell whether stale: {row['no_history']}")
        elif not row["changes"]:
            print(f"{head}; up to date")
        else:
            note = f"declared earlier: {row['earlier_commit']}" if row["earlier_commit"] else "STALE, not declared"
            print(f"{head}; {len(row['changes'])} later commits changed its dependencies ({note}):")
            print("\n".join(f"    {c}" for c in row["changes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
