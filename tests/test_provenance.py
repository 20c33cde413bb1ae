"""Numbers with their provenance (:mod:`distill.provenance`): every results table under docs/ has its record
(commit, torch, CPU capability, date) and stamp line, and no table is older than a change to the code it depends on
unless it says so, with its reason, where the README / docs cite it."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from distill import provenance as P

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_every_table_has_its_record_and_stamp():
    for stem, table in P.TABLES.items():
        for f in table.files:
            assert (ROOT / f).exists(), f"{f} (table {stem}) is missing: {table.command}"
        rec = P.read_record(stem)
        assert rec["table"] == stem and rec["command"].startswith("python -m distill.reproduce ")
        p = rec["produced"]
        for key in ("commit", "torch", "cpu_capability", "date"):
            assert key in p, f"{stem}.provenance.json lacks produced.{key}"
        assert re.fullmatch(r"[0-9a-f]{40}", p["commit"] or ""), f"{stem}: commit {p['commit']!r}"
        assert set(rec["files"]) <= {Path(f).name for f in table.files}
        md = DOCS / f"{stem}.md"
        if md.exists():  # the .md's first line is the record's stamp (and its earlier-commit note)
            assert md.read_text().splitlines()[0] == P.stamp_line(rec), f"{md}: stamp line differs from the record"


def test_every_table_under_docs_is_registered():
    """A new table under docs/ cannot skip the registry (and so the staleness check)."""
    stems = {p.stem for p in DOCS.glob("*.csv")} | {p.name.split(".")[0] for p in DOCS.glob("*.provenance.json")}
    assert stems <= set(P.TABLES), f"not in distill.provenance.TABLES: {sorted(stems - set(P.TABLES))}"


def test_declared_dependencies_exist():
    for stem, table in P.TABLES.items():
        missing = [d for d in table.depends if not (ROOT / d).exists()]
        assert not missing, f"{stem} depends on paths that do not exist (renamed?): {missing}"


def test_no_table_predates_a_change_to_its_code_unless_declared():
    stale = []
    for row in P.status():
        if row["changes"] is None:
            pytest.skip(f"git cannot tell whether {row['table']} is stale: {row['no_history']}")
        if row["changes"] and not row["earlier_commit"]:
            stale.append(
                f"{row['table']} (recorded commit {row['commit'][:10]}; changed since: "
                + ", ".join(c.split()[0] for c in row["changes"])
                + f"): regenerate with `{P.TABLES[row['table']].command}`, or declare it with "
                f'`python -m distill.provenance mark-earlier {row["table"]} "<one-line reason>"` and show the reason '
                "where the README / docs cite it"
            )
    assert not stale, "tables older than their code:\n" + "\n".join(stale)


def test_tables_from_an_earlier_commit_say_so_where_cited():
    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]}
    for stem in P.TABLES:
        reason = P.read_record(stem).get("earlier_commit")
        if not reason:
            continue
        assert "\n" not in reason and len(reason) <= 200, f"{stem}: the reason must be one short line"
        for path, text in texts.items():
            if path.name == f"{stem}.md":
                continue
            cites = P.paragraphs_citing(text, stem)
            assert not cites or any(" ".join(reason.split()) in c for c in cites), (
                f"{path.relative_to(ROOT)} cites {stem} but no paragraph that does shows its earlier-commit reason: "
                f"{reason!r}"
            )


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, env=env)
    return r.stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_changes_since_follows_git_log(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "src" / "dep.py").write_text("a = 1\n")
    (repo / "other.py").write_text("b = 1\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "start")
    c0 = _git(repo, "rev-parse", "HEAD")
    (repo / "other.py").write_text("b = 2\n")
    _git(repo, "commit", "-q", "-am", "other only")
    assert P.changes_since(c0, ("src/dep.py",), repo) == []
    (repo / "src" / "dep.py").write_text("a = 2\n")
    _git(repo, "commit", "-q", "-am", "the dependency")
    c2 = _git(repo, "rev-parse", "--short", "HEAD")
    assert P.changes_since(c0, ("src/dep.py",), repo) == [f"{c2} the dependency"]
    assert P.changes_since(c0, ("src",), repo) == [f"{c2} the dependency"]  # a directory stands for its files
    (repo / "src" / "dep.py").write_text("a = 3\n")  # uncommitted: not a change that landed
    assert len(P.changes_since(c0, ("src/dep.py",), repo)) == 1
    with pytest.raises(P.NoHistory, match="not in this clone's history"):
        P.changes_since("0" * 40, ("src/dep.py",), repo)
    with pytest.raises(P.NoHistory, match="not a git checkout"):
        P.changes_since(c0, ("src/dep.py",), tmp_path)


def test_record_stamp_and_mark_earlier(tmp_path):
    (tmp_path / "t.md").write_text("`cmd`: the table.\n\n| a |\n|---|\n| 1 |\n")
    stamp = P.record(tmp_path, "t", "python -m distill.reproduce t", ["t.md"])
    rec = json.loads((tmp_path / "t.provenance.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert rec["produced"]["commit"] == (head or None)
    assert rec["produced"]["torch"] == torch.__version__
    assert rec["produced"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert rec["earlier_commit"] is None and stamp == P.stamp_line(rec)
    assert f"torch {torch.__version__}" in stamp and rec["produced"]["date"][:10] in stamp
    md = P.with_stamp((tmp_path / "t.md").read_text(), stamp)
    assert P.with_stamp(md, stamp) == md and md.startswith(stamp + "\n\n`cmd`")
    (tmp_path / "t.md").write_text(md)
    P.mark_earlier("t", "from an older commit: reason here", tmp_path)
    rec = P.read_record("t", tmp_path)
    assert rec["earlier_commit"] == "from an older commit: reason here"
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == P.stamp_line(rec) and lines[0].endswith(f"{P.EARLIER} from an older commit: reason here")
    assert lines[2] == "`cmd`: the table." and lines.count(lines[0]) == 1
    with pytest.raises(ValueError, match="one non-empty line"):
        P.mark_earlier("t", "two\nlines", tmp_path)
    # a study records the environment it started with, not the one at its end (a commit made while it ran)
    start = {**P.produced(), "commit": "1" * 40, "dirty": False}
    P.record(tmp_path, "u", "python -m distill.reproduce u", ["u.md"], at=start)
    assert P.read_record("u", tmp_path)["produced"] == start


def test_paragraphs_citing():
    text = "Intro `docs/x_seeds.md` says 1.\n\nOther `x_seeds.py` and y_x_seeds.md.\n\n```\ndocs/x_seeds.md\n```\n"
    assert P.paragraphs_citing(text, "x_seeds") == ["Intro `docs/x_seeds.md` says 1."]
