"""Implicit volume (Instant-NGP style): the 3D scene optimised by score distillation.

Geometry (threestudio's "implicit-volume", official SDI values):
    x01 = (x / radius + 1) / 2,   e = HashGrid(x01)
    raw(x) = MLP_sigma(e) + b(x),  b(x) = s (1 - |x| / std)        ("blob_magic3d", s=10, std=0.5)
    sigma(x) = softplus(raw(x)),   albedo(x) = sigmoid(MLP_c(e))
    normal(x) = -grad raw / |grad raw|  (analytic)  or  -D sigma / |D sigma| (central differences)
The analytic gradient uses the hash grid's explicit Jacobian and the MLP's input gradient (one
ordinary backward instead of double backward; tcnn falls back to autograd with create_graph).

Shading (threestudio's diffuse-with-point-light material, Dreamfusion): with light position l,
    textureless = diffuse * max(n . normalize(l - x), 0) + ambient,  lambertian = albedo * textureless
In training renders the mode is drawn per batch: albedo for the first ``ambient_only_steps``, then
albedo with prob 1 - diffuse_prob, else textureless with prob textureless_prob, else lambertian;
the light sits at distance U(light_distance) in direction normalize(camera + perturb * N(0, I)).
Background: a neural environment map, sigmoid(MLP(SH_deg3(ray direction))), composited as
rgb = rgb_fg + (1 - opacity) * background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill import losses
from distill.config import as_dataclass
from distill.scene.cameras import Cameras
from distill.scene.hashgrid import HashGrid, HashGridConfig
from distill.scene.renderer import RendererConfig, VolumeRenderer

SHADING_MODES = ("albedo", "lambertian", "textureless")
TRAIN_SHADINGS = ("dreamfusion", "albedo")
NORMAL_TYPES = ("analytic", "finite_difference", "none")  # none: no normals (threestudio normal_type null)
DENSITY_BIASES = ("blob_magic3d", "blob_dreamfusion", "none")
DENSITY_ACTIVATIONS = ("softplus", "exp")
BACKGROUNDS = ("neural", "solid")
CONVEXITY_NORMALS = ("threestudio", "world")
NORMALS = ("auto", "always")
FIELD_AUTOCAST = ("none", "fp16", "bf16")


@dataclass
class MLPConfig:
    n_neurons: int = 64
    n_hidden_layers: int = 1


@dataclass
class MaterialConfig:
    """Dreamfusion shading (official sdi.yaml overrides threestudio's 0.75 / 0.5 probabilities)."""

    ambient_only_steps: int = 1000
    diffuse_prob: float = 0.3
    textureless_prob: float = 0.75
    ambient_light: float = 0.1
    diffuse_light: float = 0.9
    light_distance: tuple[float, float] = (0.8, 1.5)
    light_position_perturb: float = 1.0


@dataclass
class BackgroundConfig:
    kind: str = "neural"  # neural (environment map MLP) | solid
    n_neurons: int = 16
    n_hidden_layers: int = 2
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)  # used by kind=solid


@dataclass
class LossWeight:
    """Weight ``start`` up to step ``begin``, linear to ``end`` at step ``until``, then constant (threestudio's
    [begin, start, end, until]; a constant weight: start = end, until = 0)."""

    start: float = 0.0
    end: float = 0.0
    until: int = 0
    begin: int = 0

    def at(self, step: int) -> float:
        return losses.linear_schedule(step, self.start, self.end, self.until, self.begin)

    def always_zero(self) -> bool:
        return self.start == 0.0 and self.end == 0.0


@dataclass
class RegularisersConfig:
    """Official SDI loss weights (threestudio configs/sdi.yaml)."""

    orientation: LossWeight = field(default_factory=lambda: LossWeight(0.1, 0.1, 0))
    sparsity: LossWeight = field(default_factory=lambda: LossWeight(0.15, 0.0, 3000))
    opacity: LossWeight = field(default_factory=lambda: LossWeight(0.1, 0.1, 0))
    z_variance: LossWeight = field(default_factory=lambda: LossWeight(1.0, 1.0, 0))
    convexity: LossWeight = field(default_factory=lambda: LossWeight(1.0, 0.1, 4000))
    convexity_resolution: int = 8
    # "threestudio": the official input, comp_normal = (n + 1) / 2 * opacity; "world": unit normals n
    convexity_normals: str = "threestudio"


@dataclass
class OptimConfig:
    lr: float = 0.01  # geometry: hash grid + MLPs (the hash grid only when mlp_lr is set)
    mlp_lr: float | None = None  # density / feature MLPs (prolificdreamer.yaml, hifa.yaml: 0.001); null = lr
    background_lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15


class MLP(nn.Module):
    """Bias-free ReLU MLP (threestudio's VanillaMLP / tcnn FullyFusedMLP layout)."""

    def __init__(self, d_in: int, d_out: int, n_neurons: int, n_hidden_layers: int, generator: torch.Generator):
        super().__init__()
        dims = [d_in] + [n_neurons] * n_hidden_layers + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        with torch.no_grad():
            for lin in self.layers:  # nn.Linear's default U(+-1/sqrt(fan_in)), from our generator
                bound = 1.0 / math.sqrt(lin.in_features)
                lin.weight.copy_((torch.rand(lin.weight.shape, generator=generator) * 2 - 1) * bound)

    def _first(self, x: Tensor) -> Tensor:
        # inputs may carry only the first columns (inactive hash levels are 0 and are left out)
        w = self.layers[0].weight
        return F.linear(x, w if x.shape[1] == w.shape[1] else w[:, : x.shape[1]])

    def forward(self, x: Tensor) -> Tensor:
        for i, lin in enumerate(self.layers):
            x = self._first(x) if i == 0 else lin(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def forward_with_input_grad(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scalar output y (N,) and dy/dx (N, d_in), differentiable w.r.t. the weights."""
        d_in = x.shape[1]
        masks = []
        for i, lin in enumerate(self.layers[:-1]):
            pre = self._first(x) if i == 0 else lin(x)
            masks.append(pre > 0)
            x = F.relu(pre)
        last = self.layers[-1]
        if last.out_features != 1:
            raise ValueError("forward_with_input_grad needs a scalar-output MLP")
        y = last(x)[:, 0]
        g = last.weight.expand(x.shape[0], -1)  # (N, H)
        for i in range(len(masks) - 1, -1, -1):
            w = self.layers[i].weight
            g = (g * masks[i]) @ (w[:, :d_in] if i == 0 else w)
        return y, g


def spherical_harmonics_deg3(d: Tensor) -> Tensor:
    """Real SH basis up to l=2 (9 values) of unit directions d (N, 3), tcnn's constants and signs."""
    x, y, z = d.unbind(-1)
    return torch.stack(
        [
            torch.full_like(x, 0.28209479177387814),
            -0.48860251190291987 * y,
            0.48860251190291987 * z,
            -0.48860251190291987 * x,
            1.0925484305920792 * x * y,
            -1.0925484305920792 * y * z,
            0.94617469575755997 * z * z - 0.31539156525251999,
            -1.0925484305920792 * x * z,
            0.54627421529603959 * (x * x - y * y),
        ],
        dim=-1,
    )


class Background(nn.Module):
    """Background colour per ray direction: sigmoid(MLP(SH(d))) or a solid colour."""

    def __init__(self, cfg: BackgroundConfig, generator: torch.Generator):
        super().__init__()
        if cfg.kind not in BACKGROUNDS:
            raise ValueError(f"background.kind={cfg.kind!r} is not one of {list(BACKGROUNDS)}")
        self.cfg = cfg
        self.mlp = MLP(9, 3, cfg.n_neurons, cfg.n_hidden_layers, generator) if cfg.kind == "neural" else None
        self.register_buffer("color", torch.tensor(list(cfg.color), dtype=torch.float32), persistent=False)

    def forward(self, dirs: Tensor) -> Tensor:
        if self.mlp is None:
            return self.color.to(dirs.dtype).expand(dirs.shape[0], 3)
        return torch.sigmoid(self.mlp(spherical_harmonics_deg3(dirs)))


class NeRFScene(nn.Module):
    """Hash-grid density/albedo field + neural background + volume renderer (see module doc)."""

    @dataclass
    class Config:
        radius: float = 2.0
        encoding: HashGridConfig = field(default_factory=HashGridConfig)
        mlp: MLPConfig = field(default_factory=MLPConfig)
        density_activation: str = "softplus"  # softplus | exp
        density_bias: str = "blob_magic3d"  # blob_magic3d | blob_dreamfusion | none
        density_blob_scale: float = 10.0
        density_blob_std: float = 0.5
        normal_type: str = "analytic"  # analytic | finite_difference
        finite_difference_eps: float = 0.01
        # auto: training renders skip the normals when neither the shading nor a regulariser with a
        # non-zero weight at this step uses them (exact: nothing that is learned changes) | always
        normals: str = "auto"
        # memory lever: run the field (hash grid + MLPs) under torch.autocast in fp16 / bf16; the
        # compositing stays in the parameters' dtype. none = off (fp32, the reference)
        field_autocast: str = "none"
        shading: str = "dreamfusion"  # dreamfusion (random albedo/lambertian/textureless) | albedo (always)
        material: MaterialConfig = field(default_factory=MaterialConfig)
        background: BackgroundConfig = field(default_factory=BackgroundConfig)
        renderer: RendererConfig = field(default_factory=RendererConfig)
        regularisers: RegularisersConfig = field(default_factory=RegularisersConfig)
        optim: OptimConfig = field(default_factory=OptimConfig)
        seed: int = 0  # parameter initialisation and occupancy-grid jitter

        def validate(self, where: str = "scene") -> None:
            checks = (
                ("density_activation", DENSITY_ACTIVATIONS),
                ("density_bias", DENSITY_BIASES),
                ("normal_type", NORMAL_TYPES),
                ("shading", TRAIN_SHADINGS),
                ("normals", NORMALS),
                ("field_autocast", FIELD_AUTOCAST),
            )
            for name, allowed in checks:
                if getattr(self, name) not in allowed:
                    raise ValueError(f"{where}.{name}={getattr(self, name)!r} is not one of {list(allowed)}")
            if self.regularisers.convexity_normals not in CONVEXITY_NORMALS:
                raise ValueError(
                    f"{where}.regularisers.convexity_normals={self.regularisers.convexity_normals!r} "
                    f"is not one of {list(CONVEXITY_NORMALS)}"
                )
            if self.radius <= 0:
                raise ValueError(f"{where}.radius={self.radius} must be positive")
            if self.normal_type == "none":
                for name in ("orientation", "convexity"):
                    if not getattr(self.regularisers, name).always_zero():
                        raise ValueError(
                            f"{where}.normal_type=none but {where}.regularisers.{name} is not 0: that term needs "
                            f"normals; set normal_type=analytic or {where}.regularisers.{name}={{start: 0, end: 0}}"
                        )
                if self.shading != "albedo":
                    raise ValueError(
                        f"{where}.normal_type=none needs {where}.shading=albedo (shaded renders use the normals)"
                    )
            for name in ("orientation", "sparsity", "opacity", "z_variance", "convexity"):
                if getattr(self.regularisers, name).begin < 0:
                    raise ValueError(f"{where}.regularisers.{name}.begin must be >= 0")
            m = self.material
            for name in ("diffuse_prob", "textureless_prob"):
                if not 0.0 <= getattr(m, name) <= 1.0:
                    raise ValueError(f"{where}.material.{name}={getattr(m, name)} must lie in [0, 1]")
            if m.light_distance[0] > m.light_distance[1]:
                raise ValueError(f"{where}.material.light_distance={list(m.light_distance)} is out of order")
            self.encoding.validate(f"{where}.encoding")
            self.renderer.validate(f"{where}.renderer")

    def __init__(self, cfg: NeRFScene.Config | dict | None = None):
        super().__init__()
        cfg = as_dataclass(cfg, NeRFScene.Config)  # validated
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        self.encoding = HashGrid(cfg.encoding, generator=gen)
        d = self.encoding.n_output_dims
        self.density_net = MLP(d, 1, cfg.mlp.n_neurons, cfg.mlp.n_hidden_layers, gen)
        self.feature_net = MLP(d, 3, cfg.mlp.n_neurons, cfg.mlp.n_hidden_layers, gen)
        self.background = Background(cfg.background, gen)
        self.renderer = VolumeRenderer(cfg.renderer, cfg.radius)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # last update_step
        self.last_shading = "albedo"  # shading mode of the last render (for logging)
        if cfg.renderer.occupancy.enabled:
            self.update_occupancy(0)

    # -- geometry ------------------------------------------------------------------------------
    @property
    def _param(self) -> Tensor:
        return self.encoding.params

    def density_bias(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-activation bias b(x) (N,) and its gradient (N, 3)."""
        c = self.cfg
        if c.density_bias == "none":
            return x.new_zeros(x.shape[0]), x.new_zeros(x.shape)
        if c.density_bias == "blob_magic3d":  # s (1 - |x| / std)
            r = x.norm(dim=-1)
            b = c.density_blob_scale * (1.0 - r / c.density_blob_std)
            grad = -c.density_blob_scale / c.density_blob_std * x / r.clamp_min(1e-12)[:, None]
            return b, grad
        # blob_dreamfusion: s exp(-|x|^2 / (2 std^2))
        b = c.density_blob_scale * torch.exp(-0.5 * (x * x).sum(-1) / c.density_blob_std**2)
        return b, -b[:, None] * x / c.density_blob_std**2

    def _activate(self, raw: Tensor) -> Tensor:
        return F.softplus(raw) if self.cfg.density_activation == "softplus" else torch.exp(raw)

    def _to01(self, x: Tensor) -> Tensor:
        return (x / self.cfg.radius + 1.0) * 0.5

    def _encode(self, x: Tensor) -> Tensor:
        return self.encoding(self._to01(x), pad_inactive=False)

    def raw_density(self, x: Tensor) -> Tensor:
        """raw(x) = MLP_sigma(HashGrid(x01)) + b(x), (N,)."""
        return self.density_net(self._encode(x))[:, 0] + self.density_bias(x)[0]

    def density(self, points: Tensor) -> Tensor:
        """sigma(x) (N,) for world points (N, 3)."""
        return self._activate(self.raw_density(points.to(self._param.dtype)))

    def albedo(self, points: Tensor) -> Tensor:
        """albedo(x) in [0, 1], (N, 3)."""
        return torch.sigmoid(self.feature_net(self._encode(points.to(self._param.dtype))))

    def geometry(self, x: Tensor, normals: bool = True) -> dict[str, Tensor]:
        """density (N,), albedo (N, 3) and unit normal (N, 3) at world points x (N, 3); without
        ``normals`` no normal (and none of its cost: Jacobian, input gradient, differences)."""
        c = self.cfg
        x = x.detach()
        x01 = self._to01(x)
        if not normals:
            enc = self._encode(x)
            raw = self.density_net(enc)[:, 0] + self.density_bias(x)[0]
            return {"density": self._activate(raw), "albedo": torch.sigmoid(self.feature_net(enc))}
        if c.normal_type == "none":  # no normals (prolificdreamer.yaml / hifa.yaml): zeros, no gradient work
            enc = self._encode(x)
            raw = self.density_net(enc)[:, 0] + self.density_bias(x)[0]
            albedo = torch.sigmoid(self.feature_net(enc))
            return {"density": self._activate(raw), "albedo": albedo, "normal": torch.zeros_like(x)}
        if c.normal_type == "analytic" and not self.encoding.use_tcnn(x01):
            enc, jac = self.encoding(x01, with_jacobian=True, pad_inactive=False)
            h, g_enc = self.density_net.forward_with_input_grad(enc)
            bias, g_bias = self.density_bias(x)
            grad = (jac * g_enc[None]).sum(-1).t() * (0.5 / c.radius) + g_bias  # d raw / d x
            raw = h + bias
        elif c.normal_type == "analytic":  # tcnn: autograd through the encoding (double backward)
            create = torch.is_grad_enabled()
            with torch.enable_grad():
                xg = x.requires_grad_(True)
                enc = self._encode(xg)
                raw = self.density_net(enc)[:, 0] + self.density_bias(xg)[0]
                grad = torch.autograd.grad(raw.sum(), xg, create_graph=create)[0]
            if not create:
                enc, raw, grad = enc.detach(), raw.detach(), grad.detach()
        else:  # central differences of sigma, offsets clamped to the bounding cube (threestudio)
            enc = self._encode(x)
            raw = self.density_net(enc)[:, 0] + self.density_bias(x)[0]
            eps = c.finite_difference_eps
            offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps
            offsets = torch.stack([offsets, -offsets], dim=1).reshape(6, 3)  # +x, -x, +y, -y, +z, -z
            pts = (x[:, None, :] + offsets).clamp(-c.radius, c.radius).reshape(-1, 3)
            sig = self._activate(self.raw_density(pts)).view(-1, 3, 2)
            grad = (sig[..., 0] - sig[..., 1]) / (2 * eps)
        albedo = torch.sigmoid(self.feature_net(enc))
        return {"density": self._activate(raw), "albedo": albedo, "normal": -F.normalize(grad, dim=-1)}

    # -- rendering -----------------------------------------------------------------------------
    def _choose_shading(self, shading: str | None, u: Tensor) -> str:
        if shading is not None:
            if shading not in SHADING_MODES:
                raise ValueError(f"shading={shading!r} is not one of {list(SHADING_MODES)} (or None for training)")
            return shading
        m = self.cfg.material
        if self.cfg.shading == "albedo" or int(self.step) < m.ambient_only_steps or float(u[0]) > m.diffuse_prob:
            return "albedo"
        return "textureless" if float(u[1]) < m.textureless_prob else "lambertian"

    def render(
        self, cameras: Cameras, generator: torch.Generator | None = None, shading: str | None = None
    ) -> dict[str, Tensor]:
        """Render a camera batch. ``shading=None``: training render (random shading, light and
        stratified jitter, all drawn from ``generator``); otherwise an evaluation render in that
        mode with midpoint samples and the light at the camera (unless cameras.light_positions).

        Returns (B, C, H, W) maps: rgb (composited), opacity, depth, normal (unit, world space,
        0 where empty), comp_normal ((normal + 1) / 2 * opacity, threestudio's), z_variance,
        orientation (per-pixel sum_i stopgrad(w_i) max(n_i . d, 0)^2), background; and
        n_samples (0-d): field evaluations. A training render whose shading and regularisers do
        not use normals (``needs_normals``) leaves out normal, comp_normal and orientation when
        ``normals=auto``.
        """
        p = self._param
        dev, dt = p.device, p.dtype
        cams = cameras.to(dev)
        B, H, W = len(cams), cams.height, cams.width
        o, d = cams.rays()
        o, d = o.reshape(-1, 3).to(dt), d.reshape(-1, 3).to(dt)
        R = o.shape[0]
        train = shading is None
        # fixed draw order: shading (2), light (B*3 normal + B uniform), jitter (R*S)
        if train:
            u = _rand(generator, (2,), dev, dt)
            mode = self._choose_shading(None, u)
            eps_l = _rand(generator, (B, 3), dev, dt, normal=True)
            u_l = _rand(generator, (B,), dev, dt)
        else:
            mode = self._choose_shading(shading, None)
        if cams.light_positions is not None:
            light = cams.light_positions.to(dev, dt)
        elif train:
            m = self.cfg.material
            cam_pos = cams.positions.to(dt)
            direction = F.normalize(cam_pos + eps_l * m.light_position_perturb, dim=-1)
            light = direction * (m.light_distance[0] + (m.light_distance[1] - m.light_distance[0]) * u_l)[:, None]
        else:
            light = cams.positions.to(dt)
        light_per_ray = light.repeat_interleave(H * W, dim=0)  # (R, 3)
        S = self.cfg.renderer.samples_per_ray
        jitter = _rand(generator, (R, S), dev, dt) if (train and self.cfg.renderer.stratified) else None
        self.last_shading = mode
        m = self.cfg.material
        normals = not train or self.needs_normals(mode, int(self.step))
        amp = self.cfg.field_autocast
        amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)

        def field_fn(points: Tensor, ray_idx: Tensor) -> dict[str, Tensor]:
            if amp_dtype is None:
                geo = self.geometry(points, normals)
            else:  # the field in half precision, its outputs back in the compositing dtype
                with torch.autocast(dev.type, dtype=amp_dtype):
                    geo = self.geometry(points, normals)
                geo = {k: v.to(dt) for k, v in geo.items()}
            if not normals:
                return {"density": geo["density"], "rgb": geo["albedo"]}
            if mode == "albedo":
                rgb = geo["albedo"]
            else:
                ldir = F.normalize(light_per_ray[ray_idx] - points, dim=-1)
                lum = m.diffuse_light * (geo["normal"] * ldir).sum(-1).clamp_min(0.0) + m.ambient_light
                lum = lum[:, None].expand(-1, 3)
                rgb = lum if mode == "textureless" else geo["albedo"].clamp(0.0, 1.0) * lum
            return {"density": geo["density"], "rgb": rgb, "normal": geo["normal"]}

        ray = self.renderer(field_fn, o, d, jitter, normals=normals)
        bg = self.background(d)
        opacity = ray["opacity"]
        out = {
            "rgb": ray["rgb"] + (1.0 - opacity) * bg,
            "opacity": opacity,
            "depth": ray["depth"],
            "z_variance": ray["z_variance"],
            "background": bg,
        }
        if normals:
            normal = F.normalize(ray["normal_sum"], dim=-1)
            out.update(normal=normal, comp_normal=(normal + 1.0) * 0.5 * opacity, orientation=ray["orientation"])
        out = {k: v.view(B, H, W, -1).permute(0, 3, 1, 2) for k, v in out.items()}
        out["n_samples"] = ray["n_samples"]
        return out

    def needs_normals(self, mode: str, step: int) -> bool:
        """Whether a training render in shading ``mode`` at ``step`` uses normals: shading other than
        albedo, or a non-zero orientation / convexity weight (always True with ``normals=always``)."""
        if self.cfg.normals == "always" or mode != "albedo":
            return True
        r = self.cfg.regularisers
        return r.orientation.at(step) != 0.0 or r.convexity.at(step) != 0.0

    # -- training hooks ------------------------------------------------------------------------
    def update_step(self, step: int, max_steps: int) -> None:
        """Call once at the start of every training step (before ``render``): progressive hash
        levels, albedo-only warm-up, and an occupancy-grid update every update_interval steps.
        ``max_steps`` is accepted for the common scene interface; these schedules are in steps."""
        if step < 0 or step > max_steps:
            raise ValueError(f"update_step(step={step}, max_steps={max_steps}): step must lie in [0, max_steps]")
        self.encoding.update_step(step)
        self.step.fill_(step)
        occ = self.cfg.renderer.occupancy
        if occ.enabled and step % occ.update_interval == 0:
            self.update_occupancy(step)

    @torch.no_grad()
    def update_occupancy(self, step: int) -> None:
        """Occupancy-grid update with jitter seeded by (seed, step): reproducible across resumes."""
        dev = self._param.device
        gen = torch.Generator(device=dev).manual_seed(self.cfg.seed * 1_000_003 + step)
        self.renderer.grid.update(self.density, gen)

    def param_groups(self) -> list[dict]:
        """Adam parameter groups: geometry (hash grid + MLPs) and background, with lr/betas/eps."""
        o = self.cfg.optim
        common = {"betas": tuple(o.betas), "eps": o.eps}
        mlps = [*self.density_net.parameters(), *self.feature_net.parameters()]
        if o.mlp_lr is None:
            groups = [{"name": "geometry", "params": [*self.encoding.parameters(), *mlps], "lr": o.lr, **common}]
        else:  # threestudio's geometry.encoding / geometry.density_network / geometry.feature_network groups
            groups = [
                {"name": "geometry", "params": list(self.encoding.parameters()), "lr": o.lr, **common},
                {"name": "geometry_mlp", "params": mlps, "lr": o.mlp_lr, **common},
            ]
        bg = list(self.background.parameters())
        if bg:
            groups.append({"name": "background", "params": bg, "lr": o.background_lr, **common})
        return groups

    def regularisers(self, out: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """Weighted regularisers at ``step`` (only those whose weight is non-zero); sum them."""
        r = self.cfg.regularisers
        terms = {
            "orientation": (r.orientation, lambda: losses.orientation_loss(out["orientation"], out["opacity"])),
            "sparsity": (r.sparsity, lambda: losses.sparsity_loss(out["opacity"])),
            "opacity": (r.opacity, lambda: losses.opacity_loss(out["opacity"])),
            "z_variance": (r.z_variance, lambda: losses.z_variance_loss(out["z_variance"], out["opacity"])),
            "convexity": (
                r.convexity,
                lambda: losses.convexity_loss(
                    out["comp_normal"] if r.convexity_normals == "threestudio" else out["normal"],
                    r.convexity_resolution,
                ),
            ),
        }
        result = {}
        for name, (weight, fn) in terms.items():
            w = weight.at(step)
            if w != 0.0:
                result[name] = w * fn()
        return result


def _rand(
    generator: torch.Generator | None, shape: tuple, device: torch.device, dtype: torch.dtype, normal: bool = False
) -> Tensor:
    """Uniform [0,1) (or standard normal) numbers from ``generator`` (global RNG when None)."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    fn = torch.randn if normal else torch.rand
    return fn(shape, generator=generator, device=gdev).to(device=device, dtype=dtype)
