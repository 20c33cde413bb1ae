"""The grid of a sweep: which swept value is which column, which prompt which row, which run sits in each cell.

Axes come from ``<sweep>/multirun.yaml`` as Hydra's basic sweeper builds its jobs: ``hydra.sweeper.params``
in order, then the sweep overrides of the command line (``hydra.overrides.task``); a key given twice keeps
its first position and its last values. Each run's own values are read from ``<run>/.hydra/overrides.yaml``;
both sides go through Hydra's override parser, so ``1e30`` and ``1e+30``, ``'a cat'`` and ``a cat`` match.

    rows       the prompt (and the seed when seeds are swept), ordered by the row axes
               (``prompt``, ``prompt_id``, ``seed``) in sweep order; labelled with the run's resolved prompt
    columns    the product of all other axes, first axis outermost (the sweep's job order), each value
               labelled as the paper labels it (``eval.labels``); a column without any run stays, empty

Without ``multirun.yaml`` (a single run, runs not launched by a Hydra multirun) the columns are the runs'
methods in order of appearance.

Launches (``eval.launches``): the grid of one launch uses that launch's own ``launches/<id>/multirun.yaml``;
pooled launches (``--launch all``) put each launch's grid side by side, the launch the outermost column axis
(``launch``, each column labelled with its launch id), rows shared. No torch import here.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.labels import axis_label, method_label
from eval.runs import load_yaml, natural_key, unique
from eval.table.aggregate import Aggregate, RunRecord

MULTIRUN = "multirun.yaml"
RUN_OVERRIDES = ".hydra/overrides.yaml"
ROW_KEYS = ("prompt", "prompt_id", "seed")


@dataclass
class Axis:
    key: str
    values: list[str]  # canonical strings, sweep order


@dataclass
class Column:
    values: tuple[str, ...]  # one per column axis ((method,) without multirun.yaml)
    label: str


@dataclass
class Row:
    prompt: str | None
    seed: Any
    label: str


@dataclass
class SweepGrid:
    root: Path
    column_axes: list[Axis]
    row_axes: list[Axis]
    columns: list[Column]
    rows: list[Row]
    cells: dict[tuple[int, int], RunRecord] = field(default_factory=dict)  # (row, col) -> run
    duplicates: dict[tuple[int, int], list[RunRecord]] = field(default_factory=dict)  # more runs for one cell
    unplaced: list[RunRecord] = field(default_factory=list)  # values outside the sweep's grid
    source: str = MULTIRUN  # multirun.yaml | methods | launches (pooled)
    selection: Any = None  # the eval.launches.Selection the runs come from (None: every run under root)

    def cell(self, row: int, col: int) -> RunRecord | None:
        return self.cells.get((row, col))


# ----------------------------------------------------------------------------------------------
# Hydra overrides -> canonical values
# ----------------------------------------------------------------------------------------------
def _canon(v: Any) -> str:
    from hydra.core.override_parser.types import QuotedString

    if isinstance(v, QuotedString):
        return v.text
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    return str(v)


def parse_overrides(lines: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``key=a,b`` strings -> ({key: [canonical values]}, problems); a later key replaces an earlier one's values
    but keeps its position (as Hydra's basic sweeper)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: dict[str, list[str]] = {}
    problems: list[str] = []
    for line in lines:
        try:
            o = parser.parse_overrides([str(line)])[0]
            key = str(o.key_or_group).lstrip("+~")
            vals = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        except Exception as e:  # noqa: BLE001 - glob() and friends need Hydra's config loader
            problems.append(f"{line}: {type(e).__name__}: {e}")
            continue
        out[key] = [_canon(v) for v in vals]
    return out, problems


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return load_yaml(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def sweep_axes(root: Path, multirun: Path | None = None) -> list[Axis] | None:
    """The swept axes of ``multirun`` (default ``root/multirun.yaml``) in Hydra's order, or None without a
    readable one."""
    data = _read_yaml(Path(multirun) if multirun else Path(root) / MULTIRUN)
    if not isinstance(data, dict):
        return None
    hydra = data.get("hydra") or {}
    params = (hydra.get("sweeper") or {}).get("params") or {}
    task = (hydra.get("overrides") or {}).get("task") or []
    lines = [f"{k}={v}" for k, v in params.items()] + [str(t) for t in task]
    values, _ = parse_overrides(lines)
    return [Axis(k, v) for k, v in values.items() if len(v) > 1]


def _key(line: str) -> str | None:
    """The key of a plain ``key=value`` without Hydra's parser (None when unsure: no ``=``, a package, quotes)."""
    key = line.split("=", 1)[0].strip().lstrip("+~") if "=" in line else ""
    return key if key and not any(c in key for c in "@'\" ()") else None


def run_values(run_dir: Path, keys: Collection[str] | None = None) -> dict[str, str] | None:
    """The run's own override values (``.hydra/overrides.yaml``), or None for a run without one; ``keys``: parse
    only these keys' lines (Hydra's parser takes ~3 ms a line: most of the grid's time on a large sweep)."""
    data = _read_yaml(Path(run_dir) / RUN_OVERRIDES)
    if not isinstance(data, list):
        return None
    lines = [str(x) for x in data]
    if keys is not None:
        lines = [ln for ln in lines if _key(ln) is None or _key(ln) in keys]
    values, _ = parse_overrides(lines)
    return {k: v[0] for k, v in values.items() if v}


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------
def _row_label(prompt: str | None, seed: Any, with_seed: bool) -> str:
    text = prompt if prompt else "(no prompt)"
    return f"{text} (seed {seed})" if with_seed else text


def sweep_grid(agg: Aggregate) -> SweepGrid:
    """Place every run of ``agg`` (see the module docstring); never raises for a damaged run."""
    root = Path(agg.root)
    sel = agg.selection
    if sel is not None and sel.mode == "all":
        grid = _pooled_grid(agg)
    else:
        grid = _grid(root, agg.records, sel.multirun if sel is not None else None)
    grid.selection = sel
    return grid


def _grid(root: Path, records: list[RunRecord], multirun: Path | None) -> SweepGrid:
    records = sorted(records, key=lambda r: natural_key(str(r.path)))
    axes = sweep_axes(root, multirun) if not (root / "config.yaml").is_file() else None
    keys = {a.key for a in axes} if axes is not None else set()
    per_run = {r.path: run_values(r.path, keys) for r in records} if axes is not None else {}
    if axes is not None and records and all(v is None for v in per_run.values()):
        axes = None  # multirun.yaml but no run says which job it was
    if axes is None:
        return _grid_by_method(root, records)

    col_axes = [a for a in axes if a.key not in ROW_KEYS]
    row_axes = [a for a in axes if a.key in ROW_KEYS]
    with_seed = any(a.key == "seed" for a in row_axes)
    combos = list(itertools.product(*[a.values for a in col_axes]))
    col_index = {c: i for i, c in enumerate(combos)}
    configs: dict[tuple[str, ...], dict[str, Any]] = {}

    placed: list[tuple[RunRecord, int, tuple]] = []
    unplaced: list[RunRecord] = []
    row_keys: dict[tuple, tuple] = {}  # (prompt, seed) -> sort key
    for r in records:
        vals = per_run.get(r.path) or {}
        combo = tuple(vals.get(a.key) for a in col_axes)
        if combo not in col_index:
            unplaced.append(r)
            continue
        configs.setdefault(combo, r.info.config)
        rk = (r.info.prompt, r.info.seed if with_seed else None)
        order = tuple(a.values.index(vals[a.key]) if vals.get(a.key) in a.values else len(a.values) for a in row_axes)
        row_keys[rk] = min(row_keys.get(rk, order), order)
        placed.append((r, col_index[combo], rk))
    row_list = sorted(row_keys, key=lambda k: (row_keys[k], natural_key(str(k[0]))))
    rows = [Row(p, s, _row_label(p, s, with_seed)) for p, s in row_list]
    row_index = {k: i for i, k in enumerate(row_list)}
    columns = []
    for combo in combos:
        cfg = configs.get(combo)
        label = " \u00b7 ".join(axis_label(a.key, v, cfg) for a, v in zip(col_axes, combo, strict=True))
        if not col_axes:  # only prompts / seeds swept: one column, named by the method
            label = " / ".join(unique(method_label(r.info.method) for r, _, _ in placed)) or "runs"
        columns.append(Column(tuple(combo), label))
    grid = SweepGrid(root, col_axes, row_axes, columns, rows, unplaced=unplaced)
    for r, c, rk in placed:
        _put(grid, row_index[rk], c, r)
    return grid


def _put(grid: SweepGrid, row: int, col: int, rec: RunRecord) -> None:
    if (row, col) in grid.cells:
        grid.duplicates.setdefault((row, col), []).append(rec)
    else:
        grid.cells[(row, col)] = rec


def _grid_by_method(root: Path, records: list[RunRecord]) -> SweepGrid:
    methods = unique(r.info.method for r in records)
    prompts = unique(r.info.prompt for r in records)
    columns = [Column((m,), method_label(m)) for m in methods]
    rows = [Row(p, None, _row_label(p, None, False)) for p in prompts]
    grid = SweepGrid(root, [Axis("method", methods)], [Axis("prompt", [str(p) for p in prompts])], columns, rows)
    grid.source = "methods"
    for r in records:
        _put(grid, prompts.index(r.info.prompt), methods.index(r.info.method), r)
    return grid


def _pooled_grid(agg: Aggregate) -> SweepGrid:
    """Each launch's grid (its own multirun.yaml) side by side, then the runs without a launch record; the launch
    is the first column axis, rows are merged by (prompt, seed)."""
    from eval.launches import NO_LAUNCH

    root = Path(agg.root)
    sel = agg.selection
    assert sel is not None
    parts: list[tuple[str, SweepGrid]] = []
    for la in sel.launches:
        recs = [r for r in agg.records if la.id in (r.launch or "").split(",")]
        if recs:
            parts.append((la.id, _grid(root, recs, la.multirun if la.multirun.is_file() else None)))
    free = [r for r in agg.records if (r.launch or NO_LAUNCH) == NO_LAUNCH]
    if free:
        parts.append((NO_LAUNCH, _grid(root, free, None)))
    keys = unique(a.key for _, g in parts for a in g.column_axes)
    col_axes = [Axis("launch", [lid for lid, _ in parts])] + [
        Axis(k, unique(v for _, g in parts for a in g.column_axes if a.key == k for v in a.values)) for k in keys
    ]
    row_axes = [
        Axis(k, unique(v for _, g in parts for a in g.row_axes if a.key == k for v in a.values))
        for k in unique(a.key for _, g in parts for a in g.row_axes)
    ]
    with_seed = any(a.key == "seed" for a in row_axes)
    row_keys = unique((row.prompt, row.seed if with_seed else None) for _, g in parts for row in g.rows)
    rows = [Row(p, s, _row_label(p, s, with_seed and s is not None)) for p, s in row_keys]
    row_index = {k: i for i, k in enumerate(row_keys)}
    columns: list[Column] = []
    pooled = SweepGrid(root, col_axes, row_axes, columns, rows)
    pooled.source = "launches"
    for lid, g in parts:
        names = [a.key for a in g.column_axes]
        offset = len(columns)
        for col in g.columns:
            vals = dict(zip(names, col.values))
            columns.append(Column((lid, *(vals.get(k, "") for k in keys)), f"{lid}: {col.label}"))
        for (r, c), rec in g.cells.items():
            row = g.rows[r]
            _put(pooled, row_index[(row.prompt, row.seed if with_seed else None)], offset + c, rec)
        for (r, c), recs in g.duplicates.items():
            row = g.rows[r]
            for rec in recs:
                _put(pooled, row_index[(row.prompt, row.seed if with_seed else None)], offset + c, rec)
        pooled.unplaced += g.unplaced
    return pooled
