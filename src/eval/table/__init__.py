"""Table 6.1 of a run or sweep: ``aggregate`` groups the runs by method, the renderers write it.

    paper       the paper's rows as data, method label -> paper row
    aggregate   runs -> groups (mean +- std over views, Div.%, time, memory, ground truth)
    cells       the table's cells (number formats, our rows beside the paper's, runs left out)
    markdown    table.md          csv_files   table.csv, runs.csv
    latex       table.tex         wandb_log   wandb.Tables

No torch import here: ``python -m eval table`` is quick on a large sweep.
"""

from __future__ import annotations

from pathlib import Path

from eval.table.aggregate import Aggregate, Group, RunRecord, aggregate, load_expected_prompts
from eval.table.cells import MAIN_COLUMNS, fmt_mem, fmt_pct, fmt_pm, fmt_time, gt_rows, main_rows, run_lists
from eval.table.csv_files import RUN_COLUMNS, csv_rows, run_rows, runs_csv, to_csv
from eval.table.latex import to_latex
from eval.table.markdown import to_markdown
from eval.table.paper import PAPER_ORDER, PAPER_ROWS, method_display, paper_key
from eval.table.wandb_log import log_wandb


def write_tables(agg: Aggregate, out_dir: Path | str, paper: bool = True) -> dict[str, Path]:
    """``out_dir``/table.md, table.csv, table.tex and runs.csv; returns {kind: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out_dir / "table.md",
        "csv": out_dir / "table.csv",
        "latex": out_dir / "table.tex",
        "runs": out_dir / "runs.csv",
    }
    files["markdown"].write_text(to_markdown(agg, paper))
    files["csv"].write_text(to_csv(agg, paper))
    files["latex"].write_text(to_latex(agg, paper))
    files["runs"].write_text(runs_csv(agg))
    return files


__all__ = [
    "aggregate",
    "Aggregate",
    "Group",
    "RunRecord",
    "load_expected_prompts",
    "to_markdown",
    "to_csv",
    "to_latex",
    "runs_csv",
    "csv_rows",
    "run_rows",
    "RUN_COLUMNS",
    "MAIN_COLUMNS",
    "main_rows",
    "gt_rows",
    "run_lists",
    "fmt_pm",
    "fmt_time",
    "fmt_mem",
    "fmt_pct",
    "write_tables",
    "log_wandb",
    "PAPER_ROWS",
    "PAPER_ORDER",
    "paper_key",
    "method_display",
]
