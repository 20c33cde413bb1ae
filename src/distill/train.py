"""The training loop: one explicit place where a scene is distilled from a frozen prior.

    for step in range(start, max_steps):
        cameras = sample_cameras(...)                      # random view (3D) / none (2D)
        x0      = prior.encode(scene.render(cameras).rgb)  # differentiable
        out     = guidance.step(x0, prompts(cameras), step)  # SDS or SDI, guidance.py
        loss    = out.loss + sum(scene.regularisers(...))
        optimiser step; checkpoint; log
All randomness flows from one torch.Generator seeded by ``seed`` and saved in the checkpoint, so
a run re-launched in the same directory continues exactly where it stopped (from checkpoints/last.pt, or from
checkpoints/prev.pt when last.pt cannot be read; see :mod:`distill.rundir`).
"""

from __future__ import annotations

import json
import logging
import re
import resource
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from distill import env, identity, rundir
from distill.config import (
    ConfigError,
    OptimizerConfig,
    TrainerConfig,
    build,
    component_config,
    explain_group_conflict,
    typed,
)
from distill.ddim import InversionConfig
from distill.guidance import CFGConfig
from distill.images import image_contrast, save_png, to_uint8
from distill.interrupts import Interrupted, StopAtStepBoundary, signal_name
from distill.kappa import KappaConfig, make_kappa
from distill.methods import build_guidance
from distill.priors.base import PriorError
from distill.prompts import PromptConfig, PromptProcessor
from distill.scene.cameras import CameraSamplerConfig, orbit_cameras, sample_cameras
from distill.schedule import TimeSchedule, TimeScheduleConfig

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """Every typed piece of a run's config, checked before any compute."""

    trainer: TrainerConfig
    optimizer: OptimizerConfig
    guidance: Any  # the method's own typed Config (distill.guidance.GuidanceConfig, distill.methods.*)
    cfg_pair: CFGConfig
    kappa: KappaConfig
    inversion: InversionConfig
    schedule: TimeScheduleConfig
    camera: CameraSamplerConfig
    prompt: PromptConfig
    prompt_text: str
    seed: int


def check_run_config(cfg: DictConfig) -> RunSpec:
    """Type-check the whole config (raises ConfigError naming the bad key) without building models."""
    if not isinstance(cfg.get("prompt"), str) or not cfg.prompt.strip():
        raise ConfigError(f"prompt={cfg.get('prompt')!r} must be a non-empty string")
    if not isinstance(cfg.get("seed"), int):
        raise ConfigError(f"seed={cfg.get('seed')!r} must be an integer")
    pp = dict(OmegaConf.to_container(cfg.get("prompt_processor") or {}, resolve=True))
    pp["prompt"] = cfg.prompt
    spec = RunSpec(
        trainer=typed(cfg.trainer, TrainerConfig, "trainer"),
        optimizer=typed(cfg.optimizer, OptimizerConfig, "optimizer"),
        guidance=component_config(cfg.guidance, "guidance")[1],
        cfg_pair=typed(cfg.cfg, CFGConfig, "cfg"),
        kappa=typed(cfg.kappa, KappaConfig, "kappa"),
        inversion=typed(cfg.inversion, InversionConfig, "inversion"),
        schedule=typed(cfg.schedule, TimeScheduleConfig, "schedule"),
        camera=typed(cfg.camera, CameraSamplerConfig, "camera"),
        prompt=typed(pp, PromptConfig, "prompt_processor"),
        prompt_text=cfg.prompt,
        seed=cfg.seed,
    )
    for where in ("prior", "scene", "logger"):
        try:
            component_config(cfg[where], where)
        except ConfigError as e:
            key = str(e).split(":", 1)[0]
            raise ConfigError(f"{e}{explain_group_conflict(cfg, key)}") from None
    return spec


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=cpu or auto")
    return dev


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA OOM, a CPU allocator failure ("DefaultCPUAllocator: can't allocate memory") or a MemoryError."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "CUDA out of memory" in msg)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def make_optimizer(spec: RunSpec, scene: torch.nn.Module) -> torch.optim.Optimizer:
    groups = scene.param_groups()
    o = spec.optimizer
    if o.name == "adam":
        return torch.optim.Adam(groups, betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=spec.optimizer.momentum)


class Trainer:
    """Holds the built pieces of one run; ``fit()`` runs the loop and returns the final metrics."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.spec = spec = check_run_config(cfg)
        self.device = pick_device(spec.trainer.device)
        if spec.trainer.threads > 0:
            torch.set_num_threads(spec.trainer.threads)
        torch.manual_seed(spec.seed)
        self.generator = torch.Generator().manual_seed(spec.seed)
        self.prior = build(cfg.prior, "prior", device=self.device)
        if isinstance(self.prior, torch.nn.Module):
            self.prior = self.prior.to(self.device).eval()
        self.scene = build(cfg.scene, "scene").to(self.device)
        self.prompts = PromptProcessor(spec.prompt, self.prior)
        self.kappa = make_kappa(spec.kappa, spec.inversion)
        self.guidance = build_guidance(
            cfg.guidance,
            prior=self.prior,
            kappa=self.kappa,
            schedule=TimeSchedule(spec.schedule, self.prior.num_train_timesteps),
            cfg_pair=spec.cfg_pair,
            device=self.device,
            max_steps=spec.trainer.max_steps,
            target_every=spec.trainer.target_every,
        )
        self.optimizer = make_optimizer(spec, self.scene)
        self.is_3d = hasattr(self.scene, "density")
        if self.is_3d and spec.kappa.name == "cached":
            raise ConfigError(
                "kappa=cached needs the previous step's eps of the same view: a 2D scene (experiment=sdi_notebook_2d "
                "or scene=image); the 3D scenes draw a new random camera every step"
            )
        if getattr(getattr(self.scene, "cfg", None), "init", None) == "x0_hat":
            self.init_from_prior()
        self.step = 0
        self.resumed_from: int | None = None
        self.start_reason = "not started"
        # what the next checkpoint save does with the one already there (rundir.save_checkpoint's ``previous``)
        self.previous_checkpoint = "discard"
        self.diverged_detail: str | None = None
        self.seconds_before = 0.0
        self.saved_step: int | None = None

    @torch.no_grad()
    def init_from_prior(self) -> None:
        """The official 2D notebook's start: the image is x0_hat(x_T) with the forward CFG, x_T ~ N(0, I), and a
        cached kappa starts from eps(x_T), so the cached-kappa run is DDIM from x_T."""
        from distill.ddim import predict_x0
        from distill.guidance import guided_eps

        img = self.scene.image
        T = self.prior.num_train_timesteps - 1
        shape = self.prior.latent_shape(img.shape[-2], img.shape[-1])
        x_T = torch.randn((1, *shape), generator=self.generator).to(self.device)
        cond = self.prompts(None, batch_size=1)
        rule = getattr(self.spec.guidance, "cfg_rule", "standard")
        eps = guided_eps(self.prior, x_T, torch.full((1,), T, device=self.device), cond, self.spec.cfg_pair.fwd, rule)
        img.copy_(self.prior.decode(predict_x0(x_T, eps, self.prior.alphas_cumprod[T])).to(img.dtype))
        if hasattr(self.kappa, "prime"):
            self.kappa.prime(eps)

    # ----- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scene": self.scene.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "guidance": self.guidance.state_dict(),
            "seconds": self.seconds_before + (time.time() - self.t_start),
        }

    def load(self, ckpt: dict[str, Any]) -> None:
        self.scene.load_state_dict(ckpt["scene"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        # both generators live on the CPU, whatever map_location put the checkpoint's tensors on
        self.generator.set_state(ckpt["generator"].cpu())
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        if "guidance" in ckpt:
            self.guidance.load_state_dict(ckpt["guidance"])
        else:  # checkpoints written before methods had state of their own
            self.kappa.load_state_dict(ckpt.get("kappa", {}))
        self.step = self.resumed_from = int(ckpt["step"])
        self.seconds_before = float(ckpt.get("seconds", 0.0))

    def cameras(self):
        if not self.is_3d:
            return None
        cfg = self.spec.camera.at_step(self.step)
        every = self.spec.trainer.target_every
        if every > 1:
            # a held target (trainer.target_every) is an image of one view: keep that camera while it is held.
            # Drawn from (seed, step // every) alone, so a run resumed in the middle of a hold finds the same view.
            g = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.step // every)
            return sample_cameras(cfg, g, self.device)
        return sample_cameras(cfg, self.generator, self.device)

    def preview_cameras(self, n: int = 4):
        c = self.spec.camera
        return orbit_cameras(n, c.height, c.width, device=self.device)

    def snapshot(self) -> np.ndarray:
        """What a person looks at: the image (2D) or 4 orbit views side by side (3D)."""
        with torch.no_grad():
            if not self.is_3d:
                return to_uint8(self.scene.render(None)["rgb"])
            rgb = self.scene.render(self.preview_cameras(), shading="albedo")["rgb"]
            return np.concatenate([to_uint8(rgb[i]) for i in range(rgb.shape[0])], axis=1)

    def base_metrics(self) -> dict[str, Any]:
        return {
            "status": "running",
            "steps": self.step,
            "max_steps": self.spec.trainer.max_steps,
            "seconds": self.seconds_before + (time.time() - self.t_start),
            "peak_memory_mb": peak_memory_mb(self.device),
            "diverged": False,
            "diverged_reason": None,
            "resumed_from_step": self.resumed_from,
            "start": self.start_reason,
            "guidance_trainable_params": sum(p.numel() for p in self.guidance.trainable_parameters()),
            "method": self.cfg.get("method", self.spec.guidance.name),
            "prompt": self.spec.prompt_text,
            "seed": self.spec.seed,
            "device": str(self.device),
        }

    def oom_detail(self, e: BaseException) -> str:
        """What ran out: the allocator's message (with the bytes it asked for) and the render size of this run."""
        said = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        asked = re.search(r"(?:tried to allocate|allocate) ([0-9.]+ ?[KMGT]?i?B|[0-9]+ bytes)", said)
        c = self.spec.camera
        size = f"render {c.height}x{c.width}, batch {c.batch_size}" if self.is_3d else "2D scene"
        return (
            f"out of memory on {self.device} at step {self.step} ({size}"
            + (f"; requested {asked.group(1)}" if asked else "")
            + f"): {said[:300]}"
        )

    # ----- the loop ------------------------------------------------------------------------------
    def resume(self, point: rundir.ResumePoint) -> None:
        """Load ``point``; a readable checkpoint that does not fit this run's config is a CheckpointError."""
        try:
            self.load(point.state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            said = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise rundir.CheckpointError(
                f"{point.path} does not fit this run's config ({said}): was the config changed since it was written? "
                f"Re-launch with the run's own config, or trainer.resume=false to start over at step 0"
            ) from None
        self.t_start = time.time()
        if point.fallback:
            self.start_reason = f"resuming from step {self.step} of the previous checkpoint: {point.note}"
            self.previous_checkpoint = "keep"  # last.pt is the unreadable one: never rotate it over prev.pt
        else:
            self.start_reason = f"resuming from step {self.step} (checkpoint in {self.run_dir})"
            self.previous_checkpoint = "rotate"

    def save(self) -> None:
        rundir.save_checkpoint(self.run_dir, self.state(), previous=self.previous_checkpoint)
        self.previous_checkpoint = "rotate"
        self.saved_step = self.step

    def fit(self, logger, start: rundir.ResumePoint | None = None, start_reason: str | None = None) -> dict[str, Any]:
        """Run the loop from ``start`` (found by :func:`train` with rundir.find_resume_point before anything is
        written; None: from step 0) to ``trainer.max_steps``. A signal stops it at a step boundary
        (:mod:`distill.interrupts`): the checkpoint then holds that boundary's state and metrics.json says
        ``interrupted``, so the re-launched run equals the uninterrupted one bit for bit."""
        from tqdm.auto import tqdm

        tr = self.spec.trainer
        self.t_start = time.time()
        if start is not None:
            self.resume(start)
        else:
            self.start_reason = start_reason or (
                "trainer.resume=false: starting at step 0" if not tr.resume else "no checkpoint: starting at step 0"
            )
        self.saved_step = self.step if start is not None else None
        log.info("%s: %s", self.run_dir, self.start_reason)
        rundir.write_metrics(self.run_dir, self.base_metrics())
        logger.rewind(self.step)  # rows a killed attempt logged after its last checkpoint are the resumed run's now
        diverged = None
        bar = tqdm(
            total=tr.max_steps,
            initial=self.step,
            disable=not tr.progress,
            desc=str(self.spec.guidance.name),
            dynamic_ncols=True,
        )
        try:
            with StopAtStepBoundary() as stop:
                while self.step < tr.max_steps:
                    if stop.requested:
                        self.stop_at_boundary(stop)  # returns only when a requeue handler let training go on
                    diverged = self.train_step(logger, bar)
                    if diverged:
                        break
                    self.step += 1
                    bar.update(1)
                    if tr.checkpoint_every and self.step % tr.checkpoint_every == 0 and self.step < tr.max_steps:
                        self.save()
                    if tr.image_every and self.step % tr.image_every == 0:
                        snap = self.snapshot()
                        save_png(self.run_dir / "images" / f"step_{self.step:06d}.png", snap)
                        logger.log_image("progress", snap, self.step)
                        logger.log_scalars({"contrast": image_contrast(snap)}, self.step)
        except (RuntimeError, MemoryError) as e:
            # the thesis counts out-of-memory runs as diverged: CUDA and CPU alike, and the sweep goes on
            if not is_out_of_memory(e):
                raise
            diverged = "oom"
            self.diverged_detail = self.oom_detail(e)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except KeyboardInterrupt:
            # a second Ctrl-C inside a step: the state is between two steps, so it is not saved; the run resumes
            # from its last checkpoint (the steps after it are taken again, as they were)
            at = self.saved_step
            m = self.base_metrics()
            m.update(status="interrupted", signal="SIGINT", steps=at or 0, interrupted_in_step=self.step)
            rundir.write_metrics(self.run_dir, m)
            where = f"the checkpoint at step {at}" if at is not None else "step 0 (no checkpoint yet)"
            raise Interrupted(
                signal.SIGINT,
                at or 0,
                f"interrupted (second Ctrl-C) inside step {self.step}: not saved; re-launch the same command to resume "
                f"from {where} in {self.run_dir}",
            ) from None
        finally:
            bar.close()
        metrics = self.base_metrics()
        if diverged:
            metrics.update(status="diverged", diverged=True, diverged_reason=diverged)
            if self.diverged_detail:
                metrics["diverged_detail"] = self.diverged_detail
            rundir.write_metrics(self.run_dir, metrics)
            log.warning(
                "run diverged (%s) at step %d%s",
                diverged,
                self.step,
                f": {self.diverged_detail}" * bool(self.diverged_detail),
            )
            return metrics
        self.save()
        metrics.update(self.finish_outputs(logger))
        metrics.update(status="finished", seconds=self.seconds_before + (time.time() - self.t_start))
        rundir.write_metrics(self.run_dir, metrics)
        return metrics

    def stop_at_boundary(self, stop: StopAtStepBoundary) -> None:
        """A signal arrived: checkpoint the state at the start of this step, record ``interrupted``, then either hand
        over to the handler that was there before (submitit requeues the job and exits) or stop (Interrupted)."""
        signum = int(stop.signum)
        name = signal_name(signum)
        self.save()
        m = self.base_metrics()
        m.update(status="interrupted", signal=name)
        rundir.write_metrics(self.run_dir, m)
        log.warning("%s at step %d: checkpoint saved, re-launch resumes from it", name, self.step)
        foreign = stop.foreign_handler(signum)
        if foreign is not None:
            stop.clear()
            foreign(signum, None)  # submitit: requeue + SystemExit; its SIGTERM "bypass" returns and training goes on
            rundir.write_metrics(self.run_dir, self.base_metrics())
            return
        raise Interrupted(
            signum,
            self.step,
            f"interrupted by {name} at step {self.step} of {self.spec.trainer.max_steps}: checkpoint saved in "
            f"{self.run_dir}; re-launch the same command to resume (bit-identical on the same CPU)",
        )

    def train_step(self, logger, bar) -> str | None:
        """One optimisation step; returns a divergence reason or None."""
        tr = self.spec.trainer
        self.scene.update_step(self.step, tr.max_steps)
        cams = self.cameras()
        out = self.scene.render(cams, generator=self.generator)
        x0 = self.prior.encode(self.guidance.encoder_input(out, cams, self.step, tr.max_steps, self.generator))
        cond = self.prompts(cams, batch_size=x0.shape[0])
        # a method with an image-space term (HiFA) also gets the render it differentiates through
        extra = {"images": out["rgb"]} if self.guidance.needs_images else {}
        g = self.guidance.step(x0, cond, self.step, tr.max_steps, self.generator, **extra)
        regs = self.scene.regularisers(out, self.step)
        loss = g.loss + sum(regs.values()) if regs else g.loss
        if not torch.isfinite(loss):
            return "nan"
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if not all(torch.isfinite(p).all() for p in self.scene.parameters()):
            return "nan"
        # a scene's own step-wise work on its parameters (Gaussians: densify / prune, lr schedules); may end the run
        hook = getattr(self.scene, "after_optimizer_step", None)
        reason = hook(self.step, self.optimizer) if hook is not None else None
        if reason:
            return reason
        if tr.log_every and self.step % tr.log_every == 0:
            values = {
                "loss": float(loss.detach()),
                "loss_sd": float(g.loss.detach()),
                "t": g.t,
                "level": g.level,
                "model_calls": g.model_calls,
            }
            # every numeric stat of the method: grad_norm, kappa_residual, phi_loss, image_loss, ...
            values.update({k: v for k, v in g.stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            values.update({f"reg/{k}": float(v.detach()) for k, v in regs.items()})
            values.update(getattr(self.scene, "log_values", dict)())  # scene-specific: n_gaussians, densify counts
            logger.log_scalars(values, self.step)
            bar.set_postfix(loss=f"{values['loss']:.4g}", t=g.t)
        return None

    def finish_outputs(self, logger) -> dict[str, Any]:
        """Final images (and video / mesh for 3D), ground-truth metrics of analytic priors."""
        out: dict[str, Any] = {}
        final = self.snapshot()
        save_png(self.run_dir / "final.png", final)
        logger.log_image("final", final, self.step)
        frames = sorted((self.run_dir / "images").glob("step_*.png"))
        if frames:
            import imageio.v3 as iio

            imgs = [iio.imread(f) for f in frames[:: max(1, len(frames) // 10)]]
            strip = np.concatenate(imgs, axis=0 if self.is_3d else 1)
            save_png(self.run_dir / "strip.png", strip)
            # does the object fade late? the final frame's contrast against the best progress frame's
            best = max(image_contrast(iio.imread(f)) for f in frames)
            out.update(contrast_final=image_contrast(final), contrast_best_progress=best)
            out["contrast_final_over_best"] = out["contrast_final"] / max(best, 1e-12)
        if self.is_3d and self.spec.trainer.export:
            from distill import export

            out.update(export.export_all(self.scene, self.run_dir, self.spec.camera, logger=logger, step=self.step))
        evaluate = getattr(self.prior, "evaluate", None)
        if callable(evaluate):
            gt = evaluate(self.scene, self.spec.prompt_text, n_views=self.spec.trainer.eval_views)
            out.update(gt)
        return out


def _start_failed(run_dir: Path, cfg: DictConfig, e: BaseException, exit_code: int, *, holds_run: bool) -> None:
    """Record a start that failed before its first step: metrics.json ``status: failed`` with the reason (one line)
    and the exit code, and the config as composed, so the evaluator lists it with its reason. A directory that holds a
    run (identity, checkpoint or result) is left exactly as it was: the message on stderr is the whole answer."""
    if holds_run:
        return
    for p in rundir.leftovers(run_dir):  # an earlier failed start's record: replaced by this one
        if p.name in (rundir.CONFIG, rundir.METRICS):
            p.unlink()
    try:
        OmegaConf.save(cfg, run_dir / rundir.CONFIG, resolve=True)
    except Exception:  # noqa: BLE001 - a value that does not resolve is the failure itself: keep it unresolved
        OmegaConf.save(cfg, run_dir / rundir.CONFIG, resolve=False)
    record = {"status": "failed", "stage": "start", "reason": rundir.one_line(e), "exit_code": exit_code, "steps": 0}
    for key in ("prompt", "seed", "method"):
        try:
            record[key] = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        except Exception:  # noqa: BLE001
            record[key] = None
    rundir.write_metrics(run_dir, record)


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return None


def train(cfg: DictConfig, run_dir: Path | str | None = None) -> dict[str, Any]:
    """Train one run of ``cfg`` in ``run_dir`` (default: ``cfg.paths.run_dir``); returns metrics.json.

    Before anything in the directory is touched: the config is type-checked and its identity compared with the one the
    directory holds (:mod:`distill.identity`: refused when it differs; a finished run of the same identity is returned
    as it is, nothing rewritten). ``trainer.resume=false`` first moves an earlier attempt into ``archive/``. A start
    that fails leaves ``metrics.json`` with ``status: failed`` and its reason (unless the directory holds a run)."""
    if run_dir is not None:  # called from Python (tests, scripts): record where the run lives
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = rundir.read_metrics(run_dir)
    status = previous.get("status")
    has_ckpt = rundir.has_checkpoint(run_dir)
    holds_run = has_ckpt or status in identity.DURABLE_STATUSES or (run_dir / identity.IDENTITY).exists()
    try:
        spec = check_run_config(cfg)  # fail before anything is written or built
        ident = identity.current(cfg)
    except ConfigError as e:
        _start_failed(run_dir, cfg, e, 2, holds_run=holds_run)
        raise
    except OmegaConfBaseException as e:  # a value that does not resolve (an interpolation, a resolver's error)
        err = ConfigError(f"the config does not resolve: {rundir.one_line(e)}")
        _start_failed(run_dir, cfg, err, 2, holds_run=holds_run)
        raise err from None
    tr = spec.trainer
    if tr.resume:
        decision = identity.check(
            run_dir, ident, status=status, has_checkpoint=has_ckpt, allow_code_change=tr.allow_code_change
        )
    else:
        decision = identity.Decision("new", identity.read(run_dir))
    if decision.action == "same" and status in identity.DURABLE_STATUSES:
        print(f"run {run_dir} is already {status}; nothing to do", file=sys.stderr)
        return {**previous, "nothing_to_do": True}  # (not written: the directory stays as it is, its log included)
    start = None
    if decision.action in ("same", "extend") and has_ckpt:
        # an unsafe file, or no readable checkpoint at all, stops here: nothing in the run directory is changed
        start = rundir.find_resume_point(run_dir, map_location=pick_device(tr.device))
    # ----- accepted: from here on the directory is written -----
    start_reason = None
    if start is None and rundir.leftovers(run_dir) and not rundir.is_failed_start(run_dir):
        if not tr.resume:
            why = "trainer.resume=false: starting at step 0"
        else:
            why = (
                f"no checkpoint: starting at step 0 (a previous attempt ended as {status!r} before its first "
                f"checkpoint; trainer.checkpoint_every={tr.checkpoint_every})"
            )
        moved = rundir.archive(run_dir, why)
        start_reason = f"{why}; the previous contents are in {moved}"
    elif start is None:
        for p in rundir.leftovers(run_dir):  # a failed start's record
            (shutil.rmtree if p.is_dir() else Path.unlink)(p)
    OmegaConf.save(cfg, run_dir / rundir.CONFIG, resolve=True)
    old = decision.previous if decision.action != "new" else None
    ident.segments = [*(old.segments if old else [])]
    if old and old.created:
        ident.created = old.created
    ident.segments.append(
        identity.new_segment(
            decision,
            start_step=int(start.state["step"]) if start is not None else 0,
            reason=start_reason or decision.action,
            ident=ident,
        )
    )
    for note in decision.notes:
        log.warning("%s: %s", run_dir, note)
    identity.write(run_dir, ident)
    (run_dir / rundir.ENVIRONMENT).write_text(json.dumps(env.environment(), indent=2, default=str))
    overrides = _hydra_overrides()
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")
    try:
        trainer = Trainer(cfg, run_dir)
    except (ConfigError, PriorError) as e:
        _start_failed_here(run_dir, e, 2, start)
        raise
    except Exception as e:
        _start_failed_here(run_dir, e, 1, start)
        raise
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build(cfg.logger, "logger", run_dir=run_dir, run_config=resolved, run_name=run_dir.name)
    code = 1
    try:
        metrics = trainer.fit(logger, start, start_reason=start_reason)
        logger.summary(metrics)
        code = 0
        return metrics
    except Interrupted as e:
        code = e.exit_code  # recorded by fit(): status interrupted, the step, the signal
        raise
    except rundir.CheckpointError:
        raise  # a checkpoint that does not fit: metrics.json stays as the last attempt left it
    except Exception as e:
        m = rundir.read_metrics(run_dir)
        m.update(
            status="failed",
            stage="train",
            reason=rundir.one_line(e),
            exit_code=1,
            error=traceback.format_exc(limit=20),
        )
        rundir.write_metrics(run_dir, m)
        raise
    finally:
        logger.finish(exit_code=code)


def _start_failed_here(run_dir: Path, e: BaseException, exit_code: int, start: rundir.ResumePoint | None) -> None:
    """The components could not be built (missing weights, unknown prompt, out of memory): record it in metrics.json,
    keeping what a resumable run's record says about its steps."""
    m = rundir.read_metrics(run_dir) if start is not None else {"steps": 0}
    m.update(status="failed", stage="start", reason=rundir.one_line(e), exit_code=exit_code)
    if start is not None:
        m["steps"] = int(start.state["step"])
    rundir.write_metrics(run_dir, m)
