"""3D Gaussian Splatting scene (threestudio-3dgs / graphdeco lineage), rendered by a plain-PyTorch rasterizer
(:mod:`distill.scene.rasterizer`, CPU and CUDA) or by gsplat (CUDA, optional).

Parameters per Gaussian i: mean mu_i, log-scales s^_i (s_i = exp s^_i), a quaternion q_i (wxyz, normalised in the
projection), an opacity logit (o_i = sigmoid), SH degree-0 colour f_i (c_i = max(0, 0.5 + C0 f_i)).

Initialisation (threestudio-3dgs): ``n_init`` points uniform in the ball |x| <= ``init_radius`` (radius ~ U^(1/3)),
grey (c = 0.5), opacity ``init_opacity``, identity rotation, isotropic scale sqrt(mean squared distance to the
3 nearest neighbours) (simple_knn's distCUDA2, here torch.cdist in blocks).

Optimiser: one Adam group per attribute (eps 1e-15); the mean's lr decays log-linearly
    lr(step) = exp((1 - u) ln lr_init + u ln lr_final),  u = clamp(step / xyz_lr_steps, 0, 1).

Densification (graphdeco clone / split / prune under a ``max_num`` cap, the opacity reset, the Adam-state surgery):
:mod:`distill.scene.densify`; the scene keeps its statistics as buffers and runs it on its schedule
(:meth:`GaussianScene.after_optimizer_step`).

Background per training render: white | black | random (a uniform colour per view) | invert (white, black with
probability ``invert_prob``, threestudio-3dgs) | learned (one trainable colour: the exact analytic priors have a
constant coloured background). Evaluation renders use ``eval_background`` (the learned colour for ``learned``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import losses
from distill.config import as_dataclass
from distill.scene import densify
from distill.scene.cameras import Cameras
from distill.scene.densify import STATS, DensifyConfig
from distill.scene.nerf import LossWeight
from distill.scene.rasterizer import (
    RasterConfig,
    camera_matrices,
    covariances,
    project,
    rasterize,
    rgb_to_sh0,
    sh0_to_rgb,
)

RASTERIZERS = ("torch", "gsplat", "auto")
BACKGROUNDS = ("white", "black", "random", "invert", "learned")


@dataclass
class GaussianOptimConfig:
    """Per-attribute Adam learning rates (threestudio-3dgs gaussian_splatting.yaml)."""

    xyz_lr_init: float = 1e-3
    xyz_lr_final: float = 2e-5
    xyz_lr_steps: int = 1000
    feature_lr: float = 1e-2
    opacity_lr: float = 5e-2
    scaling_lr: float = 5e-3
    rotation_lr: float = 5e-3
    background_lr: float = 1e-3  # background=learned
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-15


@dataclass
class GaussianRegularisersConfig:
    """Recipe regularisers (threestudio-3dgs, LucidDreamer) on the Gaussians and their renders. The NeRF scene's
    names are accepted so that a prior can set them for either scene (conf/prior/analytic3d.yaml): sparsity,
    opacity and z_variance act on the rendered alpha / depth variance; orientation and convexity need surface
    normals, which Gaussians do not render, and must stay 0."""

    position: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))  # mean |mu|
    scale: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))  # sum_i sum_k s_ik
    tv: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))  # total variation of the rgb render
    sparsity: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))
    opacity: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))
    z_variance: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))
    orientation: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))
    convexity: LossWeight = field(default_factory=lambda: LossWeight(0.0, 0.0, 0))
    convexity_resolution: int = 8  # accepted for the NeRF names; unused
    convexity_normals: str = "threestudio"  # accepted for the NeRF names; unused


def tv_loss(img: Tensor) -> Tensor:
    """mean |x[h+1] - x[h]|^2 + mean |x[w+1] - x[w]|^2 over a (B, C, H, W) map."""
    return (img[..., 1:, :] - img[..., :-1, :]).pow(2).mean() + (img[..., :, 1:] - img[..., :, :-1]).pow(2).mean()


def gsplat_available() -> tuple[bool, str]:
    try:
        import gsplat  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"{type(e).__name__}: {e}"
    return True, ""


class GaussianScene(nn.Module):
    """3D Gaussians + rasterizer + densification (module doc)."""

    @dataclass
    class Config:
        n_init: int = 4096
        init_radius: float = 0.8
        init_opacity: float = 0.2
        init_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
        sh_degree: int = 0  # only degree 0 (every public text-to-3DGS config)
        radius: float = 2.0  # bounding sphere of the scene: the mesh export's grid
        rasterizer: str = "auto"  # torch | gsplat (CUDA) | auto: gsplat on CUDA when importable
        raster: RasterConfig = field(default_factory=RasterConfig)
        background: str = "invert"  # white | black | random | invert | learned
        invert_prob: float = 0.5
        eval_background: tuple[float, float, float] = (1.0, 1.0, 1.0)
        learned_background_init: tuple[float, float, float] = (0.5, 0.5, 0.5)
        shading: str = "albedo"  # Gaussians carry colour only (accepted so a prior can ask for albedo renders)
        densify: DensifyConfig = field(default_factory=DensifyConfig)
        regularisers: GaussianRegularisersConfig = field(default_factory=GaussianRegularisersConfig)
        optim: GaussianOptimConfig = field(default_factory=GaussianOptimConfig)
        mesh_threshold: float = 0.8  # density iso-level of the exported mesh (threestudio-3dgs 0.8; DreamGaussian 1)
        seed: int = 0

        def validate(self, where: str = "scene") -> None:
            if self.rasterizer not in RASTERIZERS:
                raise ValueError(
                    f"{where}.rasterizer={self.rasterizer!r} is not one of {list(RASTERIZERS)} "
                    "(torch: plain PyTorch, CPU and CUDA; gsplat: pip install gsplat, CUDA only)"
                )
            if self.rasterizer == "gsplat":
                ok, why = gsplat_available()
                if not ok:
                    raise ValueError(
                        f"{where}.rasterizer=gsplat but gsplat cannot be imported ({why}): pip install gsplat on a "
                        f"CUDA machine, or use {where}.rasterizer=torch (or auto)"
                    )
            if self.background not in BACKGROUNDS:
                raise ValueError(f"{where}.background={self.background!r} is not one of {list(BACKGROUNDS)}")
            if self.shading != "albedo":
                raise ValueError(f"{where}.shading={self.shading!r}: Gaussians render colour only; use albedo")
            if self.sh_degree != 0:
                raise ValueError(f"{where}.sh_degree={self.sh_degree}: only degree 0 is implemented")
            if self.n_init < 4:
                raise ValueError(f"{where}.n_init={self.n_init} must be >= 4 (3 nearest neighbours set the scale)")
            if self.init_radius <= 0 or self.radius <= 0:
                raise ValueError(f"{where}.init_radius and {where}.radius must be positive")
            if not 0.0 < self.init_opacity < 1.0:
                raise ValueError(f"{where}.init_opacity={self.init_opacity} must lie in (0, 1)")
            if not 0.0 <= self.invert_prob <= 1.0:
                raise ValueError(f"{where}.invert_prob={self.invert_prob} must lie in [0, 1]")
            for name in ("orientation", "convexity"):
                w = getattr(self.regularisers, name)
                if w.start != 0.0 or w.end != 0.0:
                    raise ValueError(
                        f"{where}.regularisers.{name}={{start: {w.start}, end: {w.end}}}: needs surface normals, "
                        "which Gaussians do not render; set it to 0"
                    )
            self.raster.validate(f"{where}.raster")
            self.densify.validate(f"{where}.densify")

    def __init__(self, cfg: GaussianScene.Config | dict | None = None):
        super().__init__()
        cfg = as_dataclass(cfg, GaussianScene.Config)  # validated
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        n = cfg.n_init
        direction = F.normalize(torch.randn(n, 3, generator=gen), dim=-1)
        means = direction * (cfg.init_radius * torch.rand(n, 1, generator=gen).pow(1.0 / 3.0))
        scale = knn_scale(means, k=3)
        rgb = torch.tensor(list(cfg.init_color), dtype=torch.float32).expand(n, 3)
        self.means = nn.Parameter(means)
        self.log_scales = nn.Parameter(scale.log()[:, None].repeat(1, 3))
        self.quats = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1))
        p = cfg.init_opacity
        self.opacity_logits = nn.Parameter(torch.full((n,), math.log(p / (1 - p))))
        self.f_dc = nn.Parameter(rgb_to_sh0(rgb).clone())
        bg0 = torch.tensor(list(cfg.learned_background_init)).clamp(1e-4, 1 - 1e-4)
        self.background_logit = nn.Parameter(torch.log(bg0 / (1 - bg0)), requires_grad=cfg.background == "learned")
        # densification statistics (saved with the scene: a resumed run continues the same interval)
        for name in STATS:
            self.register_buffer(name, torch.zeros(n))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("max_steps", torch.zeros((), dtype=torch.int64))
        self.last_shading = "albedo"
        self.last_stats: dict[str, float] = {}
        self._screen: tuple[Tensor, Tensor, int, int] | None = None  # means2d (retained grad), radii, W, H

    # -- basic properties ----------------------------------------------------------------------
    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    @property
    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity_logits)

    @property
    def scales(self) -> Tensor:
        return torch.exp(self.log_scales)

    @property
    def colors(self) -> Tensor:
        return sh0_to_rgb(self.f_dc)

    def backend(self, device: torch.device) -> str:
        r = self.cfg.rasterizer
        if r == "auto":
            return "gsplat" if device.type == "cuda" and gsplat_available()[0] else "torch"
        if r == "gsplat" and device.type != "cuda":
            raise ValueError("scene.rasterizer=gsplat needs CUDA tensors; use scene.rasterizer=torch on the CPU")
        return r

    # -- rendering -----------------------------------------------------------------------------
    def _backgrounds(self, B: int, train: bool, generator: torch.Generator | None, dev, dt) -> Tensor:
        kind = self.cfg.background
        if kind == "learned":
            return torch.sigmoid(self.background_logit).to(dt)[None].expand(B, 3)
        if not train:
            return torch.tensor(list(self.cfg.eval_background), dtype=dt, device=dev)[None].expand(B, 3)
        if kind == "white":
            return torch.ones(B, 3, dtype=dt, device=dev)
        if kind == "black":
            return torch.zeros(B, 3, dtype=dt, device=dev)
        gdev = generator.device if generator is not None else torch.device("cpu")
        if kind == "random":
            return torch.rand(B, 3, generator=generator, device=gdev).to(dev, dt)
        u = torch.rand(B, generator=generator, device=gdev).to(dev)  # invert: white, black with invert_prob
        return (u >= self.cfg.invert_prob).to(dt)[:, None].expand(B, 3)

    def render(
        self, cameras: Cameras, generator: torch.Generator | None = None, shading: str | None = None
    ) -> dict[str, Tensor]:
        """Render a camera batch. ``shading=None``: training render (background per ``cfg.background``, drawn from
        ``generator``; screen-space means kept for densification); ``"albedo"``: evaluation render on
        ``eval_background``. Returns (B, C, H, W) maps rgb, opacity, depth (sum_i w_i z_i), expected_depth,
        z_variance (sum_i w_i z_i^2 / alpha - expected_depth^2), background; and n_gaussians (0-d)."""
        if shading is not None and shading not in ("albedo", "lambertian", "textureless"):
            raise ValueError(f"shading={shading!r} is not one of ['albedo'] (or None for training)")
        # lambertian / textureless (asked for by exports written for the NeRF scene) render the colour as well
        train = shading is None
        p = self.means
        dev, dt = p.device, p.dtype
        cams = cameras.to(dev)
        B, H, W = len(cams), cams.height, cams.width
        bg = self._backgrounds(B, train, generator, dev, dt)
        viewmats, Ks = camera_matrices(cams)
        viewmats, Ks = viewmats.to(dt), Ks.to(dt)
        opac, scales, colors = self.opacities, self.scales, self.colors
        if self.backend(dev) == "gsplat":
            rgb, alpha, depth, depth_sq, means2d, radii = self._render_gsplat(viewmats, Ks, W, H, opac, scales, bg)
        else:
            proj = project(p, covariances(self.quats, scales), viewmats, Ks, W, H, self.cfg.raster, opacities=opac)
            means2d, radii = proj.means2d, proj.radii
            out = rasterize(proj, opac, colors, W, H, self.cfg.raster, background=bg)
            rgb, alpha, depth, depth_sq = out["rgb"], out["alpha"], out["depth"], out["depth_sq"]
        if train and torch.is_grad_enabled() and means2d.requires_grad:
            means2d.retain_grad()
            self._screen = (means2d, radii.detach(), W, H)
        else:
            self._screen = None
        self.last_shading = "albedo"
        ed = depth / alpha.clamp_min(1e-10)
        zvar = (depth_sq / alpha.clamp_min(1e-10) - ed * ed).clamp_min(0.0)
        maps = {
            "rgb": rgb,
            "opacity": alpha,
            "depth": depth,
            "expected_depth": ed,
            "z_variance": zvar,
            "background": bg[:, None, None, :].expand(B, H, W, 3),
        }
        maps = {k: v.permute(0, 3, 1, 2) for k, v in maps.items()}
        maps["n_gaussians"] = torch.tensor(self.num_gaussians)
        return maps

    def _render_gsplat(self, viewmats, Ks, W, H, opac, scales, bg):
        from gsplat import rasterization

        r = self.cfg.raster
        colors, alphas, meta = rasterization(
            self.means,
            F.normalize(self.quats, dim=-1),
            scales,
            opac,
            self.colors,
            viewmats,
            Ks,
            W,
            H,
            near_plane=r.near_plane,
            far_plane=r.far_plane,
            eps2d=r.eps2d,
            packed=False,
            backgrounds=None,
            render_mode="RGB+ED",
        )
        rgb_fg, ed = colors[..., :3], colors[..., 3:4]
        rgb = rgb_fg + (1.0 - alphas) * bg[:, None, None, :]
        depth = ed * alphas
        radii = meta["radii"]
        if radii.dim() == 2:  # gsplat < 1.5: one radius
            radii = radii[..., None].expand(*radii.shape, 2)
        # gsplat renders no second depth moment: z_variance is 0 with this backend
        return rgb, alphas, depth, depth * ed, meta["means2d"], radii

    # -- the 3D contract (exports, is_3d) ------------------------------------------------------
    def _field(self, points: Tensor, chunk_elems: int = 2**22) -> tuple[Tensor, Tensor]:
        """occ(x) = sum_i o_i exp(-1/2 d^T Sigma_i^-1 d) (unnormalised, DreamGaussian) and the opacity-weighted colour
        sum_i w_i(x) c_i / sum_i w_i(x), at points (M, 3)."""
        prec = torch.linalg.inv(covariances(self.quats, self.scales).double()).to(self.means.dtype)
        o, c, mu = self.opacities, self.colors, self.means
        dens, cols = [], []
        step = max(1, chunk_elems // max(1, self.num_gaussians))
        for x in points.to(mu.dtype).split(step):
            d = x[:, None, :] - mu[None]  # (m, N, 3)
            m = torch.einsum("mni,nij,mnj->mn", d, prec, d)
            w = o[None] * torch.exp(-0.5 * m)
            s = w.sum(1)
            dens.append(s)
            cols.append((w @ c) / s.clamp_min(1e-12)[:, None])
        return torch.cat(dens), torch.cat(cols)

    def density(self, points: Tensor) -> Tensor:
        """occ(x) (N,) of :meth:`_field` (the mesh export's iso-surface field)."""
        return self._field(points)[0]

    def albedo(self, points: Tensor) -> Tensor:
        return self._field(points)[1].clamp(0, 1)

    @torch.no_grad()
    def density_grid(self, resolution: int, bound: float) -> Tensor:
        """occ on the vertices of a res^3 grid over [-bound, bound]^3, indexed [i_x, i_y, i_z]: every Gaussian is
        splatted onto the grid vertices inside its 3-sigma box (DreamGaussian evaluates the same sum blockwise)."""
        dev, dt = self.means.device, self.means.dtype
        R = resolution
        h = 2 * bound / (R - 1)
        prec = torch.linalg.inv(covariances(self.quats, self.scales).double()).to(dt)
        o, mu = self.opacities, self.means
        ext = 3.0 * self.scales.max(dim=1).values  # 3 sigma of the largest axis bounds the box
        lo = torch.ceil((mu - ext[:, None] + bound) / h).clamp(0, R).long()
        hi = torch.floor((mu + ext[:, None] + bound) / h).clamp(-1, R - 1).long()
        size = (hi - lo + 1).clamp_min(0)
        cnt = size.prod(1)
        grid = torch.zeros(R**3, dtype=dt, device=dev)
        # in chunks of Gaussians so that the (Gaussian, vertex) pairs stay bounded
        order = torch.arange(len(cnt), device=dev)
        csum = torch.cumsum(cnt, 0)
        budget = 2**23
        start = 0
        while start < len(cnt):
            base = csum[start - 1] if start > 0 else csum.new_zeros(())
            end = int(torch.searchsorted(csum, base + budget, right=True))
            end = max(end, start + 1)
            idx = order[start:end]
            c = cnt[idx]
            total = int(c.sum())
            if total:
                k = torch.repeat_interleave(idx, c)
                local = torch.arange(total, device=dev) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
                sy, sz = size[k, 1], size[k, 2]
                ix = lo[k, 0] + local // (sy * sz)
                iy = lo[k, 1] + (local // sz) % sy
                iz = lo[k, 2] + local % sz
                pts = torch.stack([ix, iy, iz], 1).to(dt) * h - bound
                d = pts - mu[k]
                m = torch.einsum("mi,mij,mj->m", d, prec[k], d)
                grid.index_add_(0, (ix * R + iy) * R + iz, o[k] * torch.exp(-0.5 * m))
            start = end
        return grid.view(R, R, R)

    # -- training hooks ------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        """Scalars the trainer logs: the number of Gaussians and the last densification's counts."""
        return {
            "n_gaussians": float(self.num_gaussians),
            **{f"densify/{k}": float(v) for k, v in self.last_stats.items()},
        }

    def update_step(self, step: int, max_steps: int) -> None:
        """Called at the start of every training step (before ``render``)."""
        if step < 0 or step > max_steps:
            raise ValueError(f"update_step(step={step}, max_steps={max_steps}): step must lie in [0, max_steps]")
        self.step.fill_(step)
        self.max_steps.fill_(max_steps)

    def xyz_lr(self, step: int) -> float:
        o = self.cfg.optim
        u = min(max(step / max(o.xyz_lr_steps, 1), 0.0), 1.0)
        return math.exp((1 - u) * math.log(o.xyz_lr_init) + u * math.log(o.xyz_lr_final))

    def param_groups(self) -> list[dict]:
        """One Adam group per attribute (threestudio-3dgs), betas / eps of ``optim``."""
        o = self.cfg.optim
        common = {"betas": tuple(o.betas), "eps": o.eps}
        groups = [
            {"name": "means", "params": [self.means], "lr": self.xyz_lr(0), **common},
            {"name": "f_dc", "params": [self.f_dc], "lr": o.feature_lr, **common},
            {"name": "opacity_logits", "params": [self.opacity_logits], "lr": o.opacity_lr, **common},
            {"name": "log_scales", "params": [self.log_scales], "lr": o.scaling_lr, **common},
            {"name": "quats", "params": [self.quats], "lr": o.rotation_lr, **common},
        ]
        if self.cfg.background == "learned":
            groups.append({"name": "background", "params": [self.background_logit], "lr": o.background_lr, **common})
        return groups

    def regularisers(self, out: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Weighted regularisers at ``step`` (only those whose weight is non-zero); sum them."""
        r = self.cfg.regularisers
        terms = {
            "position": (r.position, lambda: self.means.norm(dim=-1).mean()),
            "scale": (r.scale, lambda: self.scales.sum()),
            "tv": (r.tv, lambda: tv_loss(out["rgb"])),
            "sparsity": (r.sparsity, lambda: losses.sparsity_loss(out["opacity"])),
            "opacity": (r.opacity, lambda: losses.opacity_loss(out["opacity"])),
            "z_variance": (r.z_variance, lambda: losses.z_variance_loss(out["z_variance"], out["opacity"])),
        }
        result = {}
        for name, (weight, fn) in terms.items():
            w = weight.at(step)
            if w != 0.0:
                result[name] = w * fn()
        return result

    @torch.no_grad()
    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer) -> str | None:
        """The trainer's hook after ``optimizer.step()`` of ``step``: densification statistics, densify / prune /
        opacity reset, the learning rates of step + 1. Returns a divergence reason ("nan", "empty") or None."""
        # NaN / inf means or scales (exp of the log-scale overflows): the projection would silently cull them
        if not (torch.isfinite(self.means).all() and torch.isfinite(self.scales).all()):
            return "nan"
        self.accumulate_screen_gradients()
        d = self.cfg.densify
        until = d.until if d.until >= 0 else int(self.max_steps) + 1
        self.last_stats = {}
        if d.enabled and d.start <= step < until and step > 0 and step % d.interval == 0:
            gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + step)
            self.last_stats = self.densify_and_prune(optimizer, gen)
        if d.opacity_reset_interval and step > 0 and step % d.opacity_reset_interval == 0:
            self.reset_opacity(optimizer)
        for group in optimizer.param_groups:
            if group.get("name") == "means":
                group["lr"] = self.xyz_lr(step + 1)
        if self.num_gaussians == 0:
            return "empty"
        return None

    def accumulate_screen_gradients(self) -> None:
        """Add the last training render's screen-space gradients to the densification statistics
        (:func:`distill.scene.densify.accumulate_screen_gradients`)."""
        if self._screen is None:
            return
        means2d, radii, W, H = self._screen
        self._screen = None
        densify.accumulate_screen_gradients(self, means2d, radii, W, H)

    def densify_and_prune(self, optimizer: torch.optim.Optimizer | None, generator: torch.Generator) -> dict:
        """One graphdeco densification (:func:`distill.scene.densify.densify_and_prune`). Returns counts: cloned,
        split, pruned, n_gaussians."""
        return densify.densify_and_prune(self, optimizer, generator)

    def reset_opacity(self, optimizer: torch.optim.Optimizer | None) -> None:
        """o <- min(o, 0.01) (graphdeco), with the opacity's Adam moments reset to 0."""
        densify.reset_opacity(self, optimizer)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accepts a checkpoint with any number of Gaussians: the per-Gaussian tensors are resized first (in place,
        so an optimiser built on this scene keeps its parameter references)."""
        n = state_dict["means"].shape[0] if "means" in state_dict else self.num_gaussians
        if n != self.num_gaussians:
            densify.resize(self, n)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def knn_scale(points: Tensor, k: int = 3, block: int = 2048) -> Tensor:
    """sqrt(mean squared distance to the k nearest neighbours) per point (simple_knn's distCUDA2), clamped to
    >= 1e-7, computed in blocks of rows so that memory stays O(block * N)."""
    out = []
    n = points.shape[0]
    for i in range(0, n, block):
        d2 = torch.cdist(points[i : i + block], points).pow(2)
        rows = torch.arange(i, min(i + block, n))
        d2[torch.arange(len(rows)), rows] = float("inf")
        out.append(d2.topk(min(k, n - 1), dim=1, largest=False).values.mean(1))
    return torch.cat(out).clamp_min(1e-14).sqrt()
