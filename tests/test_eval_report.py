"""The offline report on the CPU smoke sweeps (written by the sweep-end callback): valid HTML, every picture
embedded or a file that exists, every run and every Table 6.1 row in it, one curve per logged quantity; and in a
real browser (headless Chromium), no console error, no broken image, a screenshot."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from PIL import Image
from test_eval_figure import SWEEPS

from eval.table import aggregate, main_rows
from eval.table.cells import rel_path


class Page(HTMLParser):
    """Tags, ids, src / href attributes and the text of every table row."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, dict]] = []  # (tag, url, attrs)
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag not in ("img", "meta", "br", "link", "input"):
            self.open.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            if a.get(key) is not None:
                self.refs.append((tag, a[key], a))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        if tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self._cell or []).strip())
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row or [])
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    assert not p.open, f"unclosed tags: {p.open}"
    return p


@pytest.mark.parametrize("name", ["kappa_smoke", "table61_smoke"])
def test_report_is_one_offline_file_with_every_run_and_table_row(smoke_sweep, name):
    sweep = smoke_sweep(name, *SWEEPS[name])
    report = sweep / "eval" / "report.html"  # written by the sweep-end callback
    page = parse(report)
    assert page.tags[:1] == ["html"] and "script" not in page.tags and "body" in page.tags

    n_img = 0
    for tag, url, _attrs in page.refs:
        u = urlparse(url)
        assert u.scheme in ("", "data", "file"), f"network reference {url[:80]}"
        if u.scheme == "data":
            head, b64 = url.split(",", 1)
            assert head.endswith(";base64") and head[5:].startswith("image/"), head
            im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
            im.load()  # decodes: a real PNG / GIF, not a truncated string
            n_img += tag == "img"
        elif url.startswith("#"):
            assert url[1:] in page.ids, url
        else:
            assert (report.parent / unquote(u.path)).exists(), url
    # the figure, one turntable or final image per finished run, one curve per quantity
    agg = aggregate(sweep)
    quantities = set()
    for r in agg.records:
        with open(r.path / "scalars.csv", newline="") as fh:
            quantities |= {row["name"] for row in csv.DictReader(fh)}
    n_rendered = sum(r.state.state == "finished" for r in agg.records)
    curve_imgs = [a for t, u, a in page.refs if t == "img" and a.get("alt") in quantities]
    assert len(curve_imgs) == len(quantities) and n_img >= 1 + n_rendered + len(quantities)

    # every run, with its state
    text_rows = page.rows
    for r in agg.records:
        rel = rel_path(r.path, sweep)
        mine = [row for row in text_rows if rel in row]
        assert len(mine) == 1, rel
        assert r.state.state in mine[0], (rel, mine[0])
    if name == "kappa_smoke":
        assert sum("diverged" in row for row in text_rows) == 5
    # every row of Table 6.1, ours and the paper's, cell by cell
    for row in main_rows(agg, paper=True):
        assert [html.unescape(c) for c in row] in text_rows, row


def test_report_cli_on_a_single_run(smoke_sweep, tmp_path):
    from eval.__main__ import main

    sweep = smoke_sweep("cfg_smoke", *SWEEPS["cfg_smoke"])
    run = next(p.parent for p in sorted(sweep.glob("*/config.yaml")))
    assert main(["report", str(run), "--out", str(tmp_path), "--device", "cpu"]) == 0
    page = parse(tmp_path / "report.html")
    assert any(run.name in row for row in page.rows)
    fig = json.loads((tmp_path / "figure.json").read_text())
    assert len(fig["cells"]) == 1 and fig["cells"][0]["state"] == "finished"
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_report_renders_in_headless_chromium(smoke_sweep, tmp_path):
    from headless_chromium import check_page, find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    sweep = smoke_sweep("kappa_smoke", *SWEEPS["kappa_smoke"])
    shot = tmp_path / "report.png"
    r = check_page(sweep / "eval" / "report.html", shot, width=1280, max_height=3000)
    assert r.console_errors == [], r.console_errors
    assert r.n_images > 0 and r.broken_images == 0 and r.title.startswith("kappa_smoke")
    im = Image.open(shot)
    assert im.width == 1280 and im.height == min(r.height, 3000) and im.getextrema() != ((255, 255),) * 3
