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

import logging
import re
import resource
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from distill import rundir
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
from distill.kappa import KappaConfig, make_kappa
from distill.methods import build_guidance
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

    def fit(self, logger, start: rundir.ResumePoint | None = None) -> dict[str, Any]:
        """Run the loop from ``start`` (found by :func:`train` with rundir.find_resume_point before anything is
        written; None: from step 0)."""
        from tqdm.auto import tqdm

        tr = self.spec.trainer
        self.t_start = time.time()
        previous = rundir.read_metrics(self.run_dir)
        if tr.resume and previous.get("status") in ("finished", "diverged"):
            log.info("run %s is already %s; nothing to do", self.run_dir, previous["status"])
            return previous
        if start is not None and tr.resume:
            self.resume(start)
        elif not tr.resume:
            self.start_reason = "trainer.resume=false: starting at step 0"
        elif previous.get("status") in ("running", "failed"):
            # killed (SIGKILL, node failure) or crashed before its first periodic checkpoint: nothing to resume
            self.start_reason = (
                f"no checkpoint: starting at step 0 (a previous attempt ended as {previous['status']!r} "
                f"before its first checkpoint; trainer.checkpoint_every={tr.checkpoint_every})"
            )
        else:
            self.start_reason = "no checkpoint: starting at step 0"
        log.info("%s: %s", self.run_dir, self.start_reason)
        metrics = self.base_metrics()
        rundir.write_metrics(self.run_dir, metrics)
        diverged = None
        bar = tqdm(
            total=tr.max_steps,
            initial=self.step,
            disable=not tr.progress,
            desc=str(self.spec.guidance.name),
            dynamic_ncols=True,
        )
        try:
            while self.step < tr.max_steps:
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
        except (SystemExit, KeyboardInterrupt):
            # preempted / timed out (submitit raises SystemExit after asking SLURM to requeue):
            # keep every finished step, the requeued job resumes from here. An interrupt that lands
            # inside a step (after the optimiser update, before step += 1) makes the resumed run
            # repeat that one step: resumable, but then not bit-identical to an uninterrupted run.
            self.save()
            log.warning("interrupted at step %d: checkpoint saved, re-launch resumes from it", self.step)
            raise
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

    def train_step(self, logger, bar) -> str | None:
        """One optimisation step; returns a divergence reason or None."""
        tr = self.spec.trainer
        self.scene.update_step(self.step, tr.max_steps)
        cams = self.cameras()
        out = self.scene.render(cams, generator=self.generator)
        x0 = self.prior.encode(out["rgb"])
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


def train(cfg: DictConfig, run_dir: Path | str | None = None) -> dict[str, Any]:
    """Train one run of ``cfg`` in ``run_dir`` (default: ``cfg.paths.run_dir``); returns metrics.json."""
    if run_dir is not None:  # called from Python (tests, scripts): record where the run lives
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = check_run_config(cfg)  # fail before anything is written or built
    start = None
    if spec.trainer.resume and rundir.read_metrics(run_dir).get("status") not in ("finished", "diverged"):
        # an unsafe file, or no readable checkpoint at all, stops here: nothing in the run directory is changed
        start = rundir.find_resume_point(run_dir, map_location=pick_device(spec.trainer.device))
    OmegaConf.save(cfg, run_dir / rundir.CONFIG, resolve=True)
    trainer = Trainer(cfg, run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = build(cfg.logger, "logger", run_dir=run_dir, run_config=resolved, run_name=run_dir.name)
    code = 1
    try:
        metrics = trainer.fit(logger, start)
        logger.summary(metrics)
        code = 0
        return metrics
    except rundir.CheckpointError:
        raise  # the checkpoint does not fit the config: the run's metrics.json stays as the last attempt left it
    except Exception:
        m = rundir.read_metrics(run_dir)
        m.update(status="failed", error=traceback.format_exc(limit=20))
        rundir.write_metrics(run_dir, m)
        raise
    finally:
        logger.finish(exit_code=code)
