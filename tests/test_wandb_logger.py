"""WandbLogger: offline runs whose files hold the config, the summary and the media; resume keeps
the run id. The .wandb transaction log is read back record by record (LevelDB log framing +
wandb's protobuf Records), so the assertions are on what W&B would upload with `wandb sync`."""

from __future__ import annotations

import json
import os
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wandb")

from distill.loggers.wandb import (  # noqa: E402
    ID_FILE,
    STEP_KEY,
    WandbLogger,
    override_tags,
    resolve_mode,
    split_run_name,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ reading runs back
def wandb_records(path: Path) -> list:
    """Every protobuf Record of a ``run-<id>.wandb`` file.

    Format: 7-byte header (":W&B", 0xBEE1, version) then LevelDB log framing: 32 KiB blocks of
    chunks, each ``crc32 (4) | length (2) | type (1) | data``; type 1 = full, 2/3/4 = first/middle/last.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def _put(tree: dict, item) -> None:
    """Store a config/summary/history item under its key (nested_key = path into nested dicts)."""
    path = [item.key] if item.key else list(item.nested_key)
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = json.loads(item.value_json)


class OfflineRun:
    """What one offline run directory holds, decoded."""

    def __init__(self, run_dir: Path, timeout_s: float = 60.0):
        self.dir = run_dir
        files = list(run_dir.glob("run-*.wandb"))
        assert len(files) == 1, f"expected one .wandb file in {run_dir}, found {files}"
        # wandb-core writes the log in its own process: wait until the exit record is on disk
        deadline = time.monotonic() + timeout_s
        while True:
            self.records = wandb_records(files[0])
            kinds = {r.WhichOneof("record_type") for r in self.records}
            if {"run", "exit"} <= kinds or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "run" in kinds, f"{files[0]} has no run record (records: {sorted(kinds)})"
        self.run = next(r.run for r in self.records if r.WhichOneof("record_type") == "run")
        self.config: dict = {}
        self.summary: dict = {}
        self.history: list[dict] = []
        self.exit_code = None
        for r in self.records:
            kind = r.WhichOneof("record_type")
            if kind == "config":
                for it in r.config.update:
                    _put(self.config, it)
            elif kind == "summary":
                for it in r.summary.update:
                    _put(self.summary, it)
            elif kind == "history":
                row: dict = {}
                for it in r.history.item:
                    _put(row, it)
                self.history.append(row)
            elif kind == "exit":
                self.exit_code = r.exit.exit_code
        for it in self.run.config.update:  # config given to wandb.init travels in the run record
            _put(self.config, it)
        for it in self.run.summary.update:
            _put(self.summary, it)

    def config_value(self, key: str):
        v = self.config[key]
        return v["value"] if isinstance(v, dict) and "value" in v else v

    def scalars(self, name: str) -> list[tuple[int, float]]:
        return [(row[STEP_KEY], row[name]) for row in self.history if name in row]


def offline_runs(run_dir: Path) -> list[Path]:
    """Offline pieces of a run in the order they were written."""
    return sorted((run_dir / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No credentials anywhere, offline, nothing written outside tmp_path."""
    for k in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_DIR",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_PROJECT",
        "WANDB_ENTITY",
        "WANDB_RUN_GROUP",
        "WANDB_TAGS",
        "WANDB_SERVICE",
    ):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    return tmp_path


def child_env() -> dict:
    """Environment for a subprocess: its own wandb-core (wandb.init exports WANDB_SERVICE, which would
    make children attach to this process's service), the project's sources importable."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def make_video(path: Path, n: int = 6) -> Path:
    import imageio.v3 as iio

    frames = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):
        frames[i, :, : 4 * (i + 1)] = (255, 64, 0)
    iio.imwrite(path, frames, fps=6, codec="libx264")
    return path


RUN_CONFIG = {
    "seed": 3,
    "prompt": "a red circle",
    "experiment_name": "unit_sweep",
    "method": "ddim_inversion",
    "trainer": {"max_steps": 5, "checkpoint_every": 2},
}


# ------------------------------------------------------------------------------ tests
def test_mode_resolution(offline_env, monkeypatch):
    assert resolve_mode("auto") == "offline"  # no key, no netrc entry
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (offline_env / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(offline_env / "netrc"))
    assert resolve_mode("auto") == "online"  # `wandb login` leaves exactly this
    with pytest.raises(ValueError, match="logger.mode"):
        resolve_mode("sometimes")


def test_tags_from_overrides():
    tags = override_tags(
        [
            "experiment=sdi_2d",
            "seed=1",
            "+slurm=local",
            "hydra/launcher=submitit_local",
            "trainer.progress=false",
            "paths.output_root=/x",
            'prompt="a red circle"',
            "cfg.scale=7.5",
            "logger.project=p",
            "trainer.device=cpu",
        ],
        excluded={"+sweep", "trainer.device"},
    )
    assert tags == ["experiment=sdi_2d", "seed=1", "prompt=a red circle", "cfg.scale=7.5"]
    assert split_run_name("experiment=sdi_2d,seed=1,trainer.betas=[0.9,0.99]") == [
        "experiment=sdi_2d",
        "seed=1",
        "trainer.betas=[0.9,0.99]",
    ]
    assert split_run_name("default") == []


def test_offline_run_holds_config_metrics_and_media(offline_env, capsys):
    import imageio.v3 as iio

    run_dir = offline_env / "runs" / "seed=3,trainer.max_steps=5"
    cfg = WandbLogger.Config(project="sdi-test", tags=["unit"])
    logger = WandbLogger(cfg, run_dir=run_dir, run_config=RUN_CONFIG, run_name=run_dir.name)
    assert logger.mode == "offline"
    run_id = (run_dir / ID_FILE).read_text().strip()
    assert run_id == logger.run_id and len(run_id) == 8

    for step in range(5):
        logger.log_scalars({"loss": 1.0 / (step + 1), "t": 900 - step}, step)
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, :12] = (255, 0, 0)
    img[:, 12:] = (0, 0, 255)
    logger.log_image("final", img, step=4)
    png = run_dir / "final.png"
    iio.imwrite(png, img[::-1])
    logger.log_image("final_file", png, step=4)
    video = make_video(offline_env / "turntable.mp4")
    logger.log_video("turntable", video, step=4)
    logger.log_table("eval", ["view", "clip"], [[0, 0.31], [1, 0.29]])
    logger.summary({"status": "finished", "final_loss": 0.2, "steps": 5, "resumed_from_step": None})
    logger.finish(exit_code=0)
    logger.finish(exit_code=0)  # idempotent

    err = capsys.readouterr().err
    (off,) = offline_runs(run_dir)
    assert f"wandb sync {off}" in err
    assert f"-{run_id}" in off.name
    run = OfflineRun(off)

    # identity: project, group from the sweep/experiment name, tags from the overrides
    assert run.run.run_id == run_id
    assert run.run.project == "sdi-test"
    assert run.run.run_group == "unit_sweep"
    assert run.run.display_name == run_dir.name
    assert {"unit", "seed=3", "trainer.max_steps=5", "method=ddim_inversion"} <= set(run.run.tags)

    # the resolved config
    assert run.config_value("seed") == 3
    assert run.config_value("prompt") == "a red circle"
    assert run.config_value("trainer") == {"max_steps": 5, "checkpoint_every": 2}

    # scalars against trainer/step
    assert run.scalars("loss") == [(s, pytest.approx(1.0 / (s + 1))) for s in range(5)]
    assert [v for _, v in run.scalars("t")] == [900, 899, 898, 897, 896]

    # final metrics as the summary; exit code
    assert run.summary["final_loss"] == pytest.approx(0.2)
    assert run.summary["status"] == "finished"
    assert run.summary["steps"] == 5
    assert run.exit_code == 0

    # media: the image files decode to what was logged; the video is the MP4 we gave
    media = off / "files" / "media"
    rows = {k: v for row in run.history for k, v in row.items() if k in ("final", "final_file", "turntable", "eval")}
    assert rows["final"]["_type"] == "image-file" and rows["turntable"]["_type"] == "video-file"
    assert rows["eval"]["_type"] == "table-file"
    got = iio.imread(off / "files" / rows["final"]["path"])
    np.testing.assert_array_equal(got[..., :3], img)
    got2 = iio.imread(off / "files" / rows["final_file"]["path"])
    np.testing.assert_array_equal(got2[..., :3], img[::-1])
    vid = off / "files" / rows["turntable"]["path"]
    assert vid.parent == media / "videos" and vid.suffix == ".mp4"
    assert vid.read_bytes() == video.read_bytes()
    table = json.loads((off / "files" / rows["eval"]["path"]).read_text())
    assert table["columns"] == ["view", "clip"] and table["data"] == [[0, 0.31], [1, 0.29]]


def test_resume_continues_the_same_run_id(offline_env):
    run_dir = offline_env / "runs" / "seed=0"
    cfg = WandbLogger.Config(project="sdi-test")
    first = WandbLogger(cfg, run_dir=run_dir, run_config=RUN_CONFIG, run_name=run_dir.name)
    for step in range(3):
        first.log_scalars({"loss": float(step)}, step)
    first.finish(exit_code=1)  # e.g. killed / requeued: not a clean end
    run_id = (run_dir / ID_FILE).read_text().strip()
    assert not first.resumed

    second = WandbLogger(cfg, run_dir=run_dir, run_config=RUN_CONFIG, run_name=run_dir.name)
    assert second.run_id == run_id and second.resumed
    for step in range(2, 5):  # resumed from checkpoint step 2: overlaps what was logged
        second.log_scalars({"loss": 10.0 + step}, step)
    second.summary({"status": "finished"})
    second.finish(exit_code=0)

    runs = offline_runs(run_dir)
    assert len(runs) == 2 and all(f"-{run_id}" in p.name for p in runs)
    a, b = (OfflineRun(p) for p in runs)
    assert a.run.run_id == b.run.run_id == run_id
    assert a.exit_code == 1 and b.exit_code == 0
    assert [s for s, _ in a.scalars("loss")] == [0, 1, 2]
    assert b.scalars("loss") == [(2, 12.0), (3, 13.0), (4, 14.0)]
    assert b.summary["status"] == "finished"
    # the sync command for both pieces goes to the same W&B run
    dry = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", *map(str, runs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(run_id) + dry.stderr.count(run_id) >= 2


SEGMENT_SCRIPT = r"""
import logging, os, signal, sys
from pathlib import Path
from distill.loggers.wandb import WandbLogger
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
run_dir, lo, hi, interrupt = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
logger = WandbLogger(WandbLogger.Config(project="sdi-test"), run_dir=run_dir, run_config={"seed": 1}, run_name="r")
code = 0
try:
    for step in range(lo, hi):
        logger.log_scalars({"loss": 100.0 * lo + step}, step)
    if interrupt:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C / SLURM's signal: a real KeyboardInterrupt
    logger.summary({"status": "finished"})
except KeyboardInterrupt:
    code = 130
finally:
    logger.finish(exit_code=code)
print("RESUMED", logger.resumed)
sys.exit(code)
"""


def _printed_sync_command(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    i = max(i for i, line in enumerate(lines) if "upload it with:" in line)
    return shlex.split(lines[i + 1])


def test_interrupted_and_resumed_offline_run_prints_one_sync_for_every_piece(offline_env):
    """Issue 24: an offline run interrupted (real SIGINT) and resumed in a new process is two offline
    directories with one id. The command printed at the end must name both, oldest first, and what it
    names must hold every logged step; naming only the last piece (as before) loses steps 0-2."""
    script = offline_env / "segment.py"
    script.write_text(SEGMENT_SCRIPT)
    run_dir = offline_env / "runs" / "seed=1"
    env = child_env()

    def segment(lo: int, hi: int, interrupt: bool) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), str(run_dir), str(lo), str(hi), "1" if interrupt else "0"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    first = segment(0, 6, interrupt=True)
    assert first.returncode == 130, first.stdout[-3000:] + first.stderr[-3000:]
    run_id = (run_dir / ID_FILE).read_text().strip()
    (piece1,) = offline_runs(run_dir)
    assert _printed_sync_command(first.stderr) == ["wandb", "sync", str(piece1)]
    # another run whose id merely starts with this one: not a piece of this run
    other = run_dir / "wandb" / f"offline-run-20000101_000000-{run_id}x"
    other.mkdir()
    (other / f"run-{run_id}x.wandb").write_bytes((piece1 / f"run-{run_id}.wandb").read_bytes())

    second = segment(3, 8, interrupt=False)  # resumed from the checkpoint at step 3
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "RESUMED True" in second.stdout
    pieces = [p for p in offline_runs(run_dir) if p != other]
    assert len(pieces) == 2 and pieces[0] == piece1

    cmd = _printed_sync_command(second.stderr)
    assert cmd[:2] == ["wandb", "sync"] and "--id" in cmd, cmd
    assert cmd[cmd.index("--id") + 1] == run_id
    named = [Path(a) for a in cmd[2:] if a not in ("--id", run_id)]
    assert named == pieces  # every piece, oldest first, nothing else

    # what W&B's own `wandb sync` would upload from that command: both .wandb files, no error
    dry = subprocess.run(
        [sys.executable, "-m", "wandb", *cmd[1:], "--dry-run"], capture_output=True, text=True, timeout=120, env=env
    )
    assert dry.returncode == 0, dry.stderr
    listed = dry.stdout + dry.stderr
    assert "Would sync 2 run(s)" in listed and listed.count(f"run-{run_id}.wandb") == 2 and f"{run_id}x" not in listed

    # the named pieces hold every step: 0-5 from the interrupted piece, 3-7 from the resumed one
    a, b = (OfflineRun(p) for p in named)
    assert a.run.run_id == b.run.run_id == run_id
    assert a.exit_code == 130 and b.exit_code == 0
    assert a.scalars("loss") == [(s, 0.0 + s) for s in range(6)]
    assert b.scalars("loss") == [(s, 300.0 + s) for s in range(3, 8)]
    assert sorted({s for run in (a, b) for s, _ in run.scalars("loss")}) == list(range(8))
    # the last piece alone (the old message) would have left steps 0-2 out
    assert {s for s, _ in b.scalars("loss")}.isdisjoint({0, 1, 2})


def test_finish_on_error_records_the_exit_code(offline_env):
    run_dir = offline_env / "runs" / "boom"
    logger = WandbLogger(WandbLogger.Config(project="sdi-test"), run_dir=run_dir, run_config={}, run_name="boom")
    try:
        try:
            logger.log_scalars({"loss": 1.0}, 0)
            raise RuntimeError("diverged")
        finally:
            logger.finish(exit_code=1)
    except RuntimeError:
        pass
    (off,) = offline_runs(run_dir)
    run = OfflineRun(off)
    assert run.exit_code == 1
    assert run.scalars("loss") == [(0, 1.0)]


def test_logger_config_builds_from_the_project_yaml(offline_env):
    from omegaconf import OmegaConf

    from distill.config import component_config

    node = OmegaConf.load(REPO / "conf" / "logger" / "wandb.yaml")
    cls, cfg = component_config(node, "logger")
    assert cls is WandbLogger
    assert cfg.mode == "auto" and cfg.project == "sdi-lab" and cfg.tags == []


def _train(root: Path, env: dict, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=sdi_2d",
        "logger=wandb",
        "trainer.progress=false",
        f"paths.output_root={root}",
        *overrides,
    ]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not (REPO / "train.py").exists(), reason="train.py not written yet")
def test_train_py_with_wandb_logger_offline_and_relaunch(offline_env):
    """The real project: `train.py logger=wandb` offline; a re-launch in the same run directory
    (what a requeued SLURM job does) reuses the W&B run id."""
    root = offline_env / "proj"
    root.mkdir()
    env = child_env()
    args = ("seed=7", "trainer.max_steps=4", "trainer.log_every=1", "logger.project=sdi-test")
    r1 = _train(root, env, *args)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    (run_dir,) = [p.parent for p in root.rglob(ID_FILE)]
    run_id = (run_dir / ID_FILE).read_text().strip()
    (off,) = offline_runs(run_dir)
    run = OfflineRun(off)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["steps"] == 4
    assert run.run.run_group == "sdi_2d"
    assert {"seed=7", "trainer.max_steps=4", "experiment=sdi_2d"} <= set(run.run.tags)
    assert not any(t.startswith(("paths.", "trainer.progress", "logger")) for t in run.run.tags)
    assert run.config_value("seed") == 7 and run.config_value("trainer")["max_steps"] == 4
    assert [s for s, _ in run.scalars("loss")] == [0, 1, 2, 3]
    assert run.summary["status"] == "finished" and run.summary["steps"] == 4
    assert any(row.get("final", {}).get("_type") == "image-file" for row in run.history)
    assert run.exit_code == 0
    assert f"wandb sync {off}" in r1.stderr

    # same overrides -> same directory: a finished run is left as it is (no new W&B piece; identity.json); a run that
    # resumes continues the same W&B run (test_interrupted_and_resumed_offline_run_prints_one_sync_for_every_piece)
    r2 = _train(root, env, *args)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert "nothing to do" in r2.stderr
    assert offline_runs(run_dir) == [off] and (run_dir / ID_FILE).read_text().strip() == run_id


DEAD_CORE_SCRIPT = r"""
import logging, signal, sys, time
from pathlib import Path
import psutil
from distill.loggers.wandb import WandbLogger
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
run_dir = Path(sys.argv[1])
logger = WandbLogger(WandbLogger.Config(project="sdi-test"), run_dir=run_dir, run_config={"seed": 1}, run_name="r")
logger.log_scalars({"loss": 1.0}, 0)
cores = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("wandb-core")]
assert cores, "no wandb-core child"
for p in cores:
    p.send_signal(signal.SIGTERM)  # what a SLURM requeue/preemption does to every process of the step
psutil.wait_procs(cores, timeout=20)
try:
    try:
        logger.log_scalars({"loss": 2.0}, 1)
        logger.summary({"status": "running"})
        raise SystemExit(-1)  # submitit's handler after `scontrol requeue`
    finally:
        logger.finish(exit_code=1)
except SystemExit as e:
    print("SYSTEMEXIT", e.code)
"""


def test_dead_wandb_core_never_breaks_training(offline_env):
    """SLURM signals every process of a requeued job, wandb-core too; the logger must then neither
    raise nor replace submitit's SystemExit (else the requeued job is recorded as failed)."""
    script = offline_env / "dead_core.py"
    script.write_text(DEAD_CORE_SCRIPT)
    env = child_env()
    r = subprocess.run(
        [sys.executable, str(script), str(offline_env / "run")], capture_output=True, text=True, timeout=300, env=env
    )
    assert "SYSTEMEXIT -1" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "W&B logging is off" in r.stdout
