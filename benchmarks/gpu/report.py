#!/usr/bin/env python
"""The small stages of benchmarks/gpu/check.sh, each writing one JSON:

report.py env     --device cuda --install NOTE --out env.json       versions, GPU, what was installed
report.py pytest  --log pytest.log --junit junit.xml --out pytest.json   every test's outcome; failures from a
                  missing module (a package not carried to the GPU machine) counted apart from real failures
report.py tcnn    --device cuda --out tcnn.json      tinycudann hash grid against the torch one, or "not available"
report.py summary --dir OUT --stages stages.tsv --out summary.json   one table of every stage; exit 1 if a stage
                  crashed or ran past its limit
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

GOAL_MIN, GOAL_GB, STEPS = 20.0, 24.0, 10000
PAPER = {"ddim_inversion": (119.0, 39.2), "sds": (66.0, 6.2)}  # thesis, A6000, 10k steps


def write(path: str | Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ env
def cmd_env(a) -> int:
    import torch

    versions = {}
    for name in ("diffusers", "transformers", "huggingface_hub", "safetensors", "hydra", "omegaconf", "open_clip",
                 "peft", "numpy", "trimesh", "mcubes", "tinycudann", "triton", "xdist"):  # fmt: skip
        try:
            versions[name] = str(getattr(importlib.import_module(name), "__version__", "importable"))
        except Exception as e:  # noqa: BLE001 - any import failure is "missing" here
            versions[name] = f"missing ({type(e).__name__})"
    cuda = torch.cuda.is_available()
    info = dict(
        python=platform.python_version(),
        executable=sys.executable,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=cuda,
        device=a.device,
        install=a.install,
        versions=versions,
    )
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            gpu_memory_gb=p.total_memory / 1e9,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
        )
    for key, cmd in (
        ("nvidia_smi", ["nvidia-smi", "-L"]),
        ("git_commit", ["git", "-C", str(ROOT), "rev-parse", "HEAD"]),
    ):
        try:
            info[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001 - absent tool
            info[key] = None
    write(a.out, info)
    print(json.dumps({k: info.get(k) for k in ("python", "torch", "cuda_available", "gpu", "install")}))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if a.device == "cuda" and not cuda:
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ pytest
_OUTCOME = re.compile(r"(tests/\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|"
                      r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+::\S+)")  # fmt: skip
_MISSING = re.compile(r"No module named '([^'.]+)")


def cmd_pytest(a) -> int:
    tests: dict[str, dict] = {}
    log = Path(a.log).read_text(errors="replace") if Path(a.log).exists() else ""
    for m in _OUTCOME.finditer(log):  # -v lines, as they happened (kept even if the run was stopped)
        node, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        tests[node] = {"outcome": outcome.lower()}
    junit = Path(a.junit)
    if junit.exists():  # complete run: outcome and message of every test
        for case in ET.parse(junit).getroot().iter("testcase"):
            node = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (el.get("message") or "") + "\n" + (el.text or "")
            tests[node] = {"outcome": outcome, "seconds": float(case.get("time") or 0.0)}
            if message.strip():
                tests[node]["message"] = message.strip()[-800:]
    counts: dict[str, int] = {}
    missing: dict[str, list[str]] = {}
    for node, t in tests.items():
        bad = t["outcome"] in ("failed", "error")
        mod = _MISSING.search(t.get("message", "")) if bad else None
        if mod:
            t["outcome"] = "failed_missing_module"
            missing.setdefault(mod.group(1), []).append(node)
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    tail = re.findall(r"=+ (.*(?:passed|failed|error|skipped|no tests ran).*) =+", log)
    res = dict(
        device=a.device,
        complete=junit.exists(),
        counts=counts,
        missing_modules={k: len(v) for k, v in missing.items()},
        real_failures=sorted(n for n, t in tests.items() if t["outcome"] in ("failed", "error")),
        pytest_summary_line=tail[-1] if tail else None,
        tests=tests,
    )
    write(a.out, res)
    print(f"pytest on {a.device}: {counts} (complete: {res['complete']}); missing modules: {res['missing_modules']}")
    for n in res["real_failures"][:20]:
        print(f"  FAILED {n}: {tests[n].get('message', '').splitlines()[0][:160] if tests[n].get('message') else ''}")
    return 0


# ------------------------------------------------------------------------------------------------ tcnn
def cmd_tcnn(a) -> int:
    import torch

    from distill.scene.hashgrid import HashGrid, HashGridConfig, tcnn_available

    res: dict = {"device": a.device}
    if not tcnn_available():
        try:
            import tinycudann  # noqa: F401
        except Exception as e:  # noqa: BLE001 - report why
            res.update(available=False, reason=f"tinycudann is not importable: {type(e).__name__}: {e}")
    elif a.device != "cuda" or not torch.cuda.is_available():
        res.update(available=False, reason="tinycudann is importable but needs a CUDA device")
    if res.get("available") is False:
        write(a.out, res)
        print(f"tinycudann: not available ({res['reason']}); the pure-PyTorch hash grid is used")
        return 0
    dev = torch.device("cuda")
    hg = HashGrid(HashGridConfig(backend="torch"), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        hg.params.normal_()
    hg.active_levels.fill_(hg.cfg.n_levels)
    x = torch.rand(2**18, 3, device=dev)
    out = {}
    for backend in ("torch", "tcnn"):
        hg.cfg.backend = backend
        hg.params.grad = None
        enc = hg(x)
        enc.square().sum().backward()
        out[backend] = (enc.detach().float(), hg.params.grad.detach().float().clone())
        for _ in range(3):
            hg(x).square().sum().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            hg(x).square().sum().backward()
        torch.cuda.synchronize()
        res[f"{backend}_fwd_bwd_ms"] = 1e3 * (time.perf_counter() - t0) / 10
    (e_t, g_t), (e_c, g_c) = out["torch"], out["tcnn"]
    res.update(
        available=True,
        points=x.shape[0],
        rel_err_encoding=float((e_c - e_t).norm() / e_t.norm()),
        rel_err_grad=float((g_c - g_t).norm() / g_t.norm()),
        speedup_tcnn=res["torch_fwd_bwd_ms"] / res["tcnn_fwd_bwd_ms"],
    )
    write(a.out, res)
    print(
        f"tinycudann: available; rel. error encoding {res['rel_err_encoding']:.2e}, grad {res['rel_err_grad']:.2e};"
        f" fwd+bwd {res['torch_fwd_bwd_ms']:.2f} ms torch, {res['tcnn_fwd_bwd_ms']:.2f} ms tcnn"
    )
    return 0


# ------------------------------------------------------------------------------------------------ summary
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - absent or cut short
        return None


def summary_rows(d: Path) -> list[dict]:
    """One row per measured thing: it/s, 10k-step projection, peak GB, ratios to the 20 min / 24 GB goal."""
    rows: list[dict] = []
    sd = _load(d / "sd_step.json")
    if sd:
        for p in sd.get("projection", []):
            gb = max(p.get("peak_reserved_mb") or 0.0, p.get("peak_mem_mb") or 0.0) * 2**20 / 1e9
            rows.append(
                dict(
                    stage="sd_step",
                    method=f"sdi prior only ({p['impl']}, {p['variant']})",
                    status="ok",
                    it_per_s=1e3 / p["ms_per_step"] if p["ms_per_step"] > 0 else None,
                    minutes_10k=p["total_min"],
                    peak_gb=gb,
                )
            )
    for stage, name in (("train", "train_step.json"), ("methods", "train_methods.json")):
        rep = _load(d / name)
        for m in (rep or {}).get("methods", []):
            if m.get("status") != "ok":
                rows.append(dict(stage=stage, method=m["guidance"], status="failed", error=m.get("error", "")[:200]))
                continue
            gb = m["peak_reserved_gb"] if m.get("peak_reserved_gb") is not None else m.get("peak_rss_gb")
            rows.append(
                dict(
                    stage=stage,
                    method=m["guidance"],
                    status="ok",
                    it_per_s=m["it_per_s"],
                    minutes_10k=m["projected_minutes"] * STEPS / m["projected_steps"],
                    peak_gb=gb,
                    unet_calls=m.get("unet_calls_per_step"),
                    steps_timed=m.get("steps_timed"),
                    nonfinite_steps=m.get("nonfinite_steps", 0),
                    shares=m.get("parts_share"),
                )
            )
    for r in rows:
        if r["status"] == "ok":
            r["time_ratio"] = r["minutes_10k"] / GOAL_MIN
            r["mem_ratio"] = r["peak_gb"] / GOAL_GB if r["peak_gb"] is not None else None
            paper = PAPER.get(r["method"])
            r["paper"] = f"{paper[0]:g} min / {paper[1]:g} GB" if paper else None
    return rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def cmd_summary(a) -> int:
    d = Path(a.dir)
    stages = []
    if Path(a.stages).exists():
        for line in Path(a.stages).read_text().splitlines():
            name, rc, secs, limit = line.split("\t")
            rc = int(rc)
            # pytest: 1 = some tests failed (a result); 5 = none collected. Anything else nonzero: the stage broke.
            ok = rc == 0 or (name == "pytest" and rc in (1, 5))
            stages.append(
                dict(stage=name, rc=rc, seconds=int(secs), limit=int(limit), ok=ok, timed_out=rc in (124, 137))
            )
    rows = summary_rows(d)
    pt = _load(d / "pytest.json") or {}
    tc = _load(d / "tcnn.json") or {}
    env = _load(d / "env.json") or {}
    res = dict(
        device=env.get("gpu") or env.get("device"),
        torch=env.get("torch"),
        budget_s=a.budget,
        seconds=a.seconds,
        goal=dict(minutes=GOAL_MIN, gb=GOAL_GB, steps=STEPS),
        stages=stages,
        rows=rows,
        pytest=dict(
            counts=pt.get("counts"), real_failures=pt.get("real_failures"), missing_modules=pt.get("missing_modules")
        ),  # fmt: skip
        tcnn={k: tc.get(k) for k in ("available", "reason", "rel_err_encoding", "speedup_tcnn")},
        all_stages_ok=bool(stages) and all(s["ok"] for s in stages),
    )
    for item in a.extra or []:  # NAME=PATH: a stage's JSON folded in (the device tool brings back 8 files at most)
        name, _, path = item.partition("=")
        res[name] = _load(Path(path))
    write(a.out, res)
    print(f"\n==== GPU check summary: {res['device']}, torch {res['torch']}, {a.seconds} s of {a.budget} s ====")
    print("stage          rc   seconds  limit")
    for s in stages:
        flag = "" if s["ok"] else ("  TIMED OUT" if s["timed_out"] else "  FAILED")
        print(f"{s['stage']:14s} {s['rc']:3d} {s['seconds']:8d} {s['limit']:6d}{flag}")
    head = ("stage", "method", "it/s", "10k steps", "peak GB", "x 20 min", "x 24 GB")
    print("\n{:8s} {:36s} {:>8s} {:>10s} {:>8s} {:>8s} {:>8s}".format(*head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['stage']:8s} {r['method']:36s} FAILED: {r.get('error', '')[:90]}")
            continue
        ips = f"{r['it_per_s']:8.2f}" if _finite(r.get("it_per_s")) else f"{'-':>8s}"
        gb = f"{r['peak_gb']:8.2f}" if _finite(r.get("peak_gb")) else f"{'-':>8s}"
        mr = f"{r['mem_ratio']:8.2f}" if _finite(r.get("mem_ratio")) else f"{'-':>8s}"
        print(f"{r['stage']:8s} {r['method']:36s} {ips} {r['minutes_10k']:7.1f} min {gb} {r['time_ratio']:8.2f} {mr}")
    for r in rows:
        if r["status"] == "ok" and r.get("shares"):
            print(f"  {r['method']} shares: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["shares"].items()))
    for r in rows:
        if r["status"] == "ok" and r.get("nonfinite_steps"):
            print(
                f"  {r['method']}: {r['nonfinite_steps']} of {r['steps_timed']} steps had a non-finite loss (training"
                " skips their backward and optimiser step, so their time is not a full step)"
            )
    print(f"pytest: {res['pytest']['counts']}; real failures: {res['pytest']['real_failures']}")
    if tc:
        print(f"tinycudann: {'available' if tc.get('available') else 'not available'}"
              f"{'' if tc.get('available') else ' (' + str(tc.get('reason')) + ')'}")  # fmt: skip
    gs = res.get("gaussians")
    if gs:
        par = gs.get("parity") or {}
        if par.get("status") == "ok":
            print(
                f"gaussians parity torch vs gsplat {gs.get('gsplat')}: max |rgb| {par['max_abs_rgb']:.2e}, "
                f"max |alpha| {par['max_abs_alpha']:.2e}, grad rel err {par['grad_means_rel_err']:.2e}"
            )
        else:
            print(f"gaussians parity: {par.get('status')} ({par.get('reason')})")
        for r in gs.get("steps", []):
            extra = f"{r['step_ms']:.1f} ms/step" if r.get("status") == "ok" else r.get("status")
            print(f"gaussians {r['backend']:6s} {r['n']} at {r['resolution']} px x {r['batch']}: {extra}")
    print_memory(res.get("memory"))
    print(f"all stages ran: {res['all_stages_ok']}")
    return 0 if res["all_stages_ok"] else 1


def print_memory(mem: dict | None) -> None:
    """The memory stage (benchmarks/bench_memory.py, issue 20): one line per row."""
    if not mem:
        return
    print(f"\nmemory ({mem.get('device')}; GB = 1e9 B; saved = activations kept for the backward):")
    for r in mem.get("rows", []):
        if r.get("part") == "render":
            print(
                f"  render {r['resolution']}px {r['lever']:10s} samples {r['samples']:>9,d}  saved "
                f"{r['saved_bytes'] / 1e9:6.2f}  peak +{r['peak_delta_bytes'] / 1e9:6.2f}  "
                f"fwd+bwd {r['fwd_s'] + r['bwd_s']:.2f} s"
            )
        elif r.get("part") == "vae_encode_backward":
            print(f"  vae    {r['resolution']}px {r['lever']:17s} saved {r['saved_bytes'] / 1e9:6.2f}  "
                  f"peak +{r['peak_delta_bytes'] / 1e9:6.2f}")  # fmt: skip
        elif r.get("part") == "train_step":
            gb = r.get("peak_allocated_gb") if r.get("peak_allocated_gb") is not None else r.get("peak_rss_gb")
            state = f"peak {gb:6.2f} (reserved {r.get('peak_reserved_gb')})" if r.get("status") == "ok" else "FAILED"
            print(f"  step   {r['guidance']:16s} levers {r['levers']:3s} {state}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("env")
    p.add_argument("--device", default="cuda")
    p.add_argument("--install", default="")
    p.add_argument("--out", required=True)
    p = sub.add_parser("pytest")
    p.add_argument("--log", required=True)
    p.add_argument("--junit", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p = sub.add_parser("tcnn")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p = sub.add_parser("summary")
    p.add_argument("--dir", required=True)
    p.add_argument("--stages", required=True)
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--extra", nargs="*", default=[], help="NAME=PATH: a stage's JSON to fold into the summary")
    p.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    return {"env": cmd_env, "pytest": cmd_pytest, "tcnn": cmd_tcnn, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
