"""Command line: ``python -m eval {render,score,table,all,figure,report} RUN_OR_SWEEP [options]``.

    python -m eval render outputs/sweep --views 50 --resolution 512
    python -m eval score  outputs/sweep --clip-model /models/clip-vit-base-patch16
    python -m eval table  outputs/sweep --prompts ../shared/prompts/sdi43.txt --wandb
    python -m eval all    outputs/sweep --clip-model ...        # render + score + table
    python -m eval figure outputs/sweep [--wandb]              # eval/figure.png|pdf|json
    python -m eval report outputs/sweep                        # eval/report.html (one offline file)

Every command takes one run directory or a sweep directory (runs at any depth). On a sweep directory that
records launches (``<sweep>/launches/<id>/manifest.json``, one per ``python train.py -m ...``), table, figure,
report and all cover the latest launch's runs and say which launch on one line; ``--launch ID`` picks one
(an id or a unique prefix), ``--launch all`` pools every run under the directory, each labelled with its
launch. Exit status: 0 all good, 1 some run failed to render/score (the others are done), 2 bad arguments /
not a run.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from eval.runs import EvalError, find_runs


def _add_render_options(p: argparse.ArgumentParser) -> None:
    from eval.divergence import EMPTY_OPACITY_THRESHOLD, EMPTY_VIEW_FRACTION

    g = p.add_argument_group("rendering")
    g.add_argument("--views", type=int, default=50, help="views on the orbit (default 50, as the paper)")
    g.add_argument("--resolution", type=int, default=512, help="height = width of each view (default 512)")
    g.add_argument("--elevation", type=float, default=None, help="orbit elevation in degrees (default: orbit_cameras')")
    g.add_argument("--distance", type=float, default=None, help="camera distance (default: orbit_cameras')")
    g.add_argument(
        "--fovy", type=float, default=None, help="vertical field of view in degrees (default: orbit_cameras')"
    )
    g.add_argument("--render-batch", type=int, default=4, help="views rendered per batch (default 4)")
    g.add_argument(
        "--shading",
        default="auto",
        help="shading passed to scene.render: auto (lambertian with the light at the camera, as "
        "threestudio's test renders; albedo for albedo-only runs), albedo, lambertian, "
        "textureless, or none (the scene's default)",
    )
    g.add_argument(
        "--empty-opacity",
        type=float,
        default=EMPTY_OPACITY_THRESHOLD,
        help=f"a view is empty below this mean opacity (default {EMPTY_OPACITY_THRESHOLD})",
    )
    g.add_argument(
        "--empty-fraction",
        type=float,
        default=EMPTY_VIEW_FRACTION,
        help=f"a volume is empty when more than this fraction of views is empty (default {EMPTY_VIEW_FRACTION})",
    )
    g.add_argument(
        "--any-status",
        action="store_true",
        help="also render runs that are not finished (running / diverged / missing metrics.json)",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a run directory or a sweep directory holding runs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that are up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_score_options(p: argparse.ArgumentParser) -> None:
    from eval.runs import DEFAULT_CLIP_MODEL

    g = p.add_argument_group("scoring")
    g.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        help=f"HF hub id (local cache only), a local directory, or open_clip:ARCH:CHECKPOINT "
        f"(default {DEFAULT_CLIP_MODEL})",
    )
    g.add_argument("--allow-download", action="store_true", help="let transformers download the model if absent")
    g.add_argument("--batch-size", type=int, default=16, help="views per CLIP-IQA batch (default 16)")
    g.add_argument("--no-render", action="store_true", help="do not render runs whose views are missing")


def _add_launch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--launch",
        default=None,
        metavar="ID|latest|all",
        help="on a sweep directory with recorded launches: the launch whose runs to evaluate (default latest; "
        "an id or a unique prefix of one, as listed in <sweep>/launches/), or all (pool every run under the "
        "directory, each labelled with its launch)",
    )


def _selection(args: argparse.Namespace):
    """The runs the command covers (``eval.launches.select``); prints the one line saying which launch."""
    from eval.launches import LAUNCHES_DIR, select

    if not (Path(args.path) / LAUNCHES_DIR).is_dir():
        find_runs(args.path)  # fail fast on a bad path, with the usual message (a launch may have left no run)
    sel = select(args.path, getattr(args, "launch", None))
    if sel.mode != "none":
        print(sel.describe())
    return sel


def _add_table_options(p: argparse.ArgumentParser) -> None:
    _add_launch_option(p)
    g = p.add_argument_group("table")
    g.add_argument("--out", type=Path, default=None, help="output directory (default PATH/eval)")
    g.add_argument(
        "--prompts", type=Path, default=None, help="prompt file (one per line): list prompts with no run in each method"
    )
    g.add_argument("--no-paper", action="store_true", help="leave out the paper's Table 6.1 rows")
    g.add_argument("--wandb", action="store_true", help="also log the tables to W&B (offline without a key)")
    g.add_argument("--wandb-project", default="sdi-lab")
    g.add_argument("--wandb-entity", default=None)
    g.add_argument("--wandb-name", default=None)


def _add_figure_options(p: argparse.ArgumentParser, report: bool = False) -> None:
    p.add_argument("path", type=Path, help="a run directory or a sweep directory holding runs")
    p.add_argument("--out", type=Path, default=None, help="output directory (default PATH/eval)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--overwrite", action="store_true", help="render the cached views / turntables again")
    _add_launch_option(p)
    g = p.add_argument_group("figure")
    g.add_argument("--view-size", type=int, default=160, help="pixels per view in the figure (default 160)")
    g.add_argument("--shading", default="auto", help="shading of the views, as for render (default auto)")
    if report:
        g.add_argument("--turntable-frames", type=int, default=24, help="frames per turntable GIF (default 24)")
        g.add_argument("--turntable-size", type=int, default=128, help="turntable pixels (default 128)")
        g.add_argument("--no-paper", action="store_true", help="leave out the paper's Table 6.1 rows")
    else:
        g.add_argument("--wandb", action="store_true", help="also log the figure to W&B (offline without a key)")
        g.add_argument("--wandb-project", default="sdi-lab")
        g.add_argument("--wandb-entity", default=None)
        g.add_argument("--wandb-name", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("render", help="render N orbit views of finished runs -> <run>/eval/views, render.json")
    _add_common(p)
    _add_render_options(p)
    p = sub.add_parser("score", help="CLIP score + CLIP-IQA per view -> <run>/eval/scores.json")
    _add_common(p)
    _add_score_options(p)
    _add_render_options(p)
    p = sub.add_parser("table", help="Table 6.1 by method -> table.md / table.csv / table.tex / runs.csv")
    p.add_argument("path", type=Path, help="a run directory or a sweep directory holding runs")
    _add_table_options(p)
    p = sub.add_parser("all", help="render + score + table")
    _add_common(p)
    _add_score_options(p)
    _add_render_options(p)
    _add_table_options(p)
    p = sub.add_parser("figure", help="the sweep's figure: swept values x prompts -> figure.png / .pdf / .json")
    _add_figure_options(p)
    p = sub.add_parser("report", help="one offline HTML page: table, figure, runs, turntables, curves")
    _add_figure_options(p, report=True)
    return parser


def _render_opts(args: argparse.Namespace):
    from eval.render import RenderOptions

    opts = RenderOptions(
        n_views=args.views,
        resolution=args.resolution,
        elevation_deg=args.elevation,
        distance=args.distance,
        fovy_deg=args.fovy,
        batch_size=args.render_batch,
        shading=args.shading,
        empty_opacity=args.empty_opacity,
        empty_fraction=args.empty_fraction,
    )
    opts.validate()
    return opts


def _report(kind: str, results: list, failures: list[tuple[Path, str]]) -> int:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "nothing"
    if failures:
        summary += f", {len(failures)} errors"
    print(f"{kind}: {summary}")
    for path, msg in failures:
        print(f"  ERROR {path}: {msg}", file=sys.stderr)
    return 1 if failures else 0


def cmd_render(args: argparse.Namespace) -> int:
    runs = find_runs(args.path)  # fail fast, before importing torch
    opts = _render_opts(args)
    from eval.render import render_run, resolve_device

    device = resolve_device(args.device)
    print(f"render: {len(runs)} run(s) under {args.path}, {opts.n_views} views at {opts.resolution}px on {device}")
    results, failures = [], []
    for run in runs:
        try:
            r = render_run(
                run, opts, device=device, overwrite=args.overwrite, any_status=args.any_status, progress=not args.quiet
            )
            results.append(r)
            print(f"  {r.status:10s} {run}: {r.message}")
        except EvalError as e:
            failures.append((run, str(e)))
        except Exception as e:  # noqa: BLE001 - one broken run must not stop a sweep
            failures.append((run, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    return _report("render", results, failures)


def cmd_score(args: argparse.Namespace) -> int:
    runs = find_runs(args.path)  # fail fast, before importing torch / loading CLIP
    if getattr(args, "selection", None) is not None and args.selection.runs is not None:
        runs = [r for r in args.selection.runs if (r / "config.yaml").is_file()]  # `all`: the launch's runs
    opts = _render_opts(args)
    from eval.metrics import ClipEvaluator
    from eval.render import resolve_device
    from eval.score import score_run

    device = resolve_device(args.device)
    evaluator = ClipEvaluator(args.clip_model, device=device, allow_download=args.allow_download)
    print(f"score: {len(runs)} run(s) under {args.path} on {device}")
    print(f"CLIP model used: {evaluator.describe()}")
    results, failures = [], []
    for run in runs:
        try:
            r = score_run(
                run,
                evaluator,
                batch_size=args.batch_size,
                overwrite=args.overwrite,
                render=not args.no_render,
                render_opts=opts,
                any_status=args.any_status,
                device=device,
                progress=not args.quiet,
            )
            results.append(r)
            print(f"  {r.status:10s} {run}: {r.message}")
        except EvalError as e:
            failures.append((run, str(e)))
        except Exception as e:  # noqa: BLE001
            failures.append((run, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))
    print(f"CLIP model used: {evaluator.describe()}")
    return _report("score", results, failures)


def cmd_table(args: argparse.Namespace) -> int:
    from eval.table import aggregate, load_expected_prompts, log_wandb, to_markdown, write_tables

    sel = getattr(args, "selection", None) or _selection(args)
    agg = aggregate(args.path, load_expected_prompts(args.prompts), selection=sel)
    out = args.out or (Path(args.path) / "eval")
    files = write_tables(agg, out, paper=not args.no_paper)
    print(to_markdown(agg, paper=not args.no_paper))
    print("written: " + ", ".join(str(p) for p in files.values()))
    if args.wandb:
        info = log_wandb(
            agg,
            project=args.wandb_project,
            name=args.wandb_name,
            out_dir=out,
            entity=args.wandb_entity,
            paper=not args.no_paper,
        )
        print(
            f"W&B ({info['mode']}): run {info['id']} in {info['dir']}" + (f" {info['url']}" if info.get("url") else "")
        )
    return 0


def _view_opts(args: argparse.Namespace):
    from eval.views import ViewOptions

    opts = ViewOptions(size=args.view_size, shading=args.shading)
    if getattr(args, "turntable_frames", None) is not None:
        opts.turntable_frames, opts.turntable_size = args.turntable_frames, args.turntable_size
    for flag, value in (
        ("--view-size", opts.size),
        ("--turntable-frames", opts.turntable_frames),
        ("--turntable-size", opts.turntable_size),
    ):
        if value <= 0:
            raise EvalError(f"{flag} must be positive, got {value}")
    return opts


def cmd_figure(args: argparse.Namespace) -> int:
    sel = _selection(args)  # fail fast on a bad path or launch
    from eval.figure import log_wandb_figure, make_figure

    fig = make_figure(
        args.path, args.out, _view_opts(args), device=args.device, overwrite=args.overwrite, selection=sel
    )
    d = fig.data
    states: dict[str, int] = {}
    for c in d["cells"]:
        states[c["state"]] = states.get(c["state"], 0) + 1
    print(
        f"figure: {len(d['columns'])} columns ({', '.join(d['column_axes']) or 'method'}) x {len(d['rows'])} rows "
        f"({', '.join(f'{v} {k}' for k, v in states.items())}) -> {fig.png}, {fig.pdf}, {fig.sidecar}"
    )
    if args.wandb:
        info = log_wandb_figure(fig, args.wandb_project, args.wandb_name, args.wandb_entity, out_dir=fig.png.parent)
        print(
            f"W&B ({info['mode']}): run {info['id']} in {info['dir']}" + (f" {info['url']}" if info.get("url") else "")
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    sel = _selection(args)
    from eval.report import build_report

    path = build_report(
        args.path,
        args.out,
        _view_opts(args),
        device=args.device,
        overwrite=args.overwrite,
        paper=not args.no_paper,
        selection=sel,
    )
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained; open it in a browser)")
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    args.selection = _selection(args)
    code = cmd_score(args)  # renders what is missing
    return max(code, cmd_table(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {
            "render": cmd_render,
            "score": cmd_score,
            "table": cmd_table,
            "all": cmd_all,
            "figure": cmd_figure,
            "report": cmd_report,
        }
        return commands[args.command](args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
