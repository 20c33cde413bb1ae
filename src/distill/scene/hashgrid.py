"""Multiresolution hash-grid encoding (Instant-NGP), bit-compatible with tiny-cuda-nn's HashGrid.

For level l = 0..L-1 (tcnn's ``grid.h``):
    s_l   = base * 2^(l * log2(per_level_scale)) - 1          (float32, the "-1" counts vertices)
    res_l = ceil(s_l) + 1                                      vertices per axis
    T_l   = min(next_multiple(res_l^3, 8), 2^log2_hashmap_size) table rows
    p     = s_l * x + 0.5,  g = floor(p),  f = p - g          for x in [0, 1]^3
    index(c) = (c_x + c_y res_l + c_z res_l^2) mod T_l         if res_l^3 <= T_l (dense level)
             = (c_x * 1 xor c_y * 2654435761 xor c_z * 805459861) mod 2^32 mod T_l   (hashed)
    enc_l(x) = sum_{c in g + {0,1}^3} prod_k (f_k if c_k > g_k else 1 - f_k) * theta[off_l + index(c)]
The paper's "N_l = floor(N_min b^l)" is the same construction up to tcnn's vertex convention
(-1 / +1 / +0.5 offset) used here, so the torch and tcnn backends share parameters exactly:
``params`` (F, sum_l T_l) is tcnn's flat parameter vector viewed as (T, F) and transposed
(feature-major: gathers and scatters over contiguous rows, 3-4x faster on CPU).

Progressive levels (threestudio's ProgressiveBandHashGrid): only the first ``active_levels`` levels
are used, the rest output 0 (and are not computed by the torch backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

PRIMES = (1, 2654435761, 805459861)  # tcnn coherent_prime_hash factors for x, y, z
BACKENDS = ("auto", "torch", "tcnn")

try:  # optional CUDA backend; its private autograd function lets the encoding use our parameters
    import tinycudann as _tcnn  # type: ignore
    from tinycudann import modules as _tcnn_modules  # type: ignore

    _tcnn_function = _tcnn_modules._module_function
    _tcnn_precision = _tcnn_modules._torch_precision
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _tcnn = None


def tcnn_available() -> bool:
    return _tcnn is not None


@dataclass
class HashGridConfig:
    """tcnn HashGrid parameters plus the progressive-level schedule (official SDI values)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.447269237440378  # max resolution 4096
    start_level: int = 8  # levels active from the start
    start_step: int = 2000  # first step at which a level is added ...
    update_steps: int = 500  # ... then one more every this many steps
    init_scale: float = 1e-4  # table entries ~ U(-init_scale, init_scale), as tcnn
    backend: str = "auto"  # auto | torch | tcnn  (auto: tcnn when importable and the input is on CUDA)

    def validate(self, where: str = "encoding") -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"{where}.backend={self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend == "tcnn" and _tcnn is None:
            raise ValueError(f"{where}.backend='tcnn' but tinycudann is not importable; use 'torch' or 'auto'")
        for name in ("n_levels", "n_features_per_level", "base_resolution", "update_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be a positive integer")
        if not 1 <= self.log2_hashmap_size <= 30:
            raise ValueError(f"{where}.log2_hashmap_size={self.log2_hashmap_size} must lie in [1, 30]")
        if self.per_level_scale < 1.0:
            raise ValueError(f"{where}.per_level_scale={self.per_level_scale} must be >= 1")
        if not 1 <= self.start_level <= self.n_levels:
            raise ValueError(f"{where}.start_level={self.start_level} must lie in [1, n_levels={self.n_levels}]")


def level_layout(cfg: HashGridConfig) -> list[dict]:
    """Per level: scale s_l, resolution res_l, table size T_l, row offset, dense flag (tcnn's rules)."""
    f32 = np.float32  # float32 host arithmetic as tcnn: exp2f(level * log2f(scale)) * base - 1.0f
    log2_scale = f32(np.log2(f32(cfg.per_level_scale)))
    out, offset = [], 0
    for level in range(cfg.n_levels):
        s = float(f32(f32(np.exp2(f32(level) * log2_scale)) * f32(cfg.base_resolution) - f32(1.0)))
        res = int(math.ceil(s)) + 1
        dense_size = res**3
        size = min(-(-dense_size // 8) * 8, 2**cfg.log2_hashmap_size)
        out.append(dict(scale=s, resolution=res, size=size, offset=offset, dense=dense_size <= size))
        offset += size
    return out


class HashGrid(nn.Module):
    """x in [0,1]^3, shape (N, 3) -> features (N, n_levels * n_features_per_level)."""

    def __init__(self, cfg: HashGridConfig, generator: torch.Generator | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.layout = level_layout(cfg)
        L = cfg.n_levels
        self.n_output_dims = L * cfg.n_features_per_level
        self.n_rows = total = self.layout[-1]["offset"] + self.layout[-1]["size"]
        # feature-major (F, T): tcnn's flat vector is params.t().reshape(-1); this layout gathers faster
        init = (torch.rand(total, cfg.n_features_per_level, generator=generator) * 2 - 1) * cfg.init_scale
        self.params = nn.Parameter(init.t().contiguous())
        f32 = torch.float32
        self.register_buffer("scales", torch.tensor([lv["scale"] for lv in self.layout], dtype=f32), persistent=False)
        i64 = torch.int64
        self.register_buffer("res", torch.tensor([lv["resolution"] for lv in self.layout], dtype=i64), persistent=False)
        self.register_buffer("sizes", torch.tensor([lv["size"] for lv in self.layout], dtype=i64), persistent=False)
        self.register_buffer("offsets", torch.tensor([lv["offset"] for lv in self.layout], dtype=i64), persistent=False)
        # progressive levels: part of the state so that a loaded checkpoint renders as trained
        self.register_buffer("active_levels", torch.tensor(cfg.start_level, dtype=i64))
        self._tcnn_native = None  # created lazily on the first CUDA forward with the tcnn backend

    # -- progressive levels ------------------------------------------------------------------
    def levels_at(self, step: int) -> int:
        """min(start_level + max(step - start_step, 0) // update_steps, n_levels)."""
        c = self.cfg
        return min(c.start_level + max(step - c.start_step, 0) // c.update_steps, c.n_levels)

    def update_step(self, step: int) -> None:
        self.active_levels.fill_(self.levels_at(step))

    # -- forward -----------------------------------------------------------------------------
    def use_tcnn(self, x: Tensor) -> bool:
        b = self.cfg.backend
        return b == "tcnn" or (b == "auto" and _tcnn is not None and x.is_cuda)

    def forward(
        self, x: Tensor, with_jacobian: bool = False, pad_inactive: bool = True
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Encoding (N, L*F); with ``with_jacobian`` also jac (3, N, L*F), jac[k] = d enc / d x_k (torch backend).

        ``pad_inactive=False`` returns only the active levels' columns, (N, active_levels*F): the
        inactive ones are 0, so a following linear layer may skip them (the torch backend does).
        """
        if x.dim() != 2 or x.shape[-1] != 3:
            raise ValueError(f"HashGrid expects points of shape (N, 3), got {tuple(x.shape)}")
        if self.use_tcnn(x):
            if with_jacobian:
                raise ValueError("the tcnn backend has no explicit Jacobian; differentiate its output with autograd")
            return self._forward_tcnn(x)
        return self._forward_torch(x, with_jacobian, pad_inactive)

    def corner_indices(self, g: Tensor) -> Tensor:
        """Table columns (2z, 2y, 2x, A, N) of the cube corners g + {0,1}^3 for g (3, A, N) int64.

        Per-axis terms are formed in int64 on (2, A, N) and reduced mod 2^32 (the hash is uint32
        arithmetic), the 8-corner combination runs in int32 when the table fits (half the traffic).
        """
        A, N = g.shape[1], g.shape[2]
        res, size, off = self.res[:A, None], self.sizes[:A, None], self.offsets[:A, None]
        itype = torch.int32 if self.n_rows < 2**31 - 1 else torch.int64
        cx = torch.stack([g[0], g[0] + 1])  # (2, A, N)
        cy = torch.stack([g[1], g[1] + 1])
        cz = torch.stack([g[2], g[2] + 1])
        out = torch.empty(2, 2, 2, A, N, dtype=itype, device=g.device)
        n_dense = sum(lv["dense"] for lv in self.layout[:A])  # dense levels first (resolution grows)
        if n_dense > 0:
            d = slice(0, n_dense)
            r = res[d]
            v = out[:, :, :, d]
            v.copy_(cx[None, None, :, d])  # broadcast over z, y
            v.add_((cy[:, d] * r).to(itype)[None, :, None]).add_((cz[:, d] * (r * r)).to(itype)[:, None, None])
            if bool((g[:, d] + 1 >= r).any()):  # a corner beyond the grid wraps around, as in tcnn
                v.remainder_(size[d].to(itype))
            v.add_(off[d].to(itype))
        if n_dense < A:
            h = slice(n_dense, A)  # table size 2^log2_hashmap_size: "mod 2^32 mod T" is a bit mask
            u32 = 0xFFFFFFFF

            def term(c: Tensor, prime: int) -> Tensor:  # uint32 product, same bits in int32
                t = (c[:, h] * prime) & u32
                return (t - (t >> 31) * 2**32).to(itype) if itype == torch.int32 else t

            v = out[:, :, :, h]
            v.copy_(term(cx, PRIMES[0])[None, None])
            v.bitwise_xor_(term(cy, PRIMES[1])[None, :, None]).bitwise_xor_(term(cz, PRIMES[2])[:, None, None])
            v.bitwise_and_((size[h] - 1).to(itype)).add_(off[h].to(itype))
        return out

    def _forward_torch(self, x: Tensor, with_jacobian: bool, pad_inactive: bool) -> Tensor | tuple[Tensor, Tensor]:
        if with_jacobian and x.requires_grad:
            raise ValueError(
                "with_jacobian=True returns d enc/dx, which is not differentiable w.r.t. x; "
                "pass points that do not require grad"
            )
        A, L = int(self.active_levels), self.cfg.n_levels
        F_ = self.cfg.n_features_per_level
        N = x.shape[0]
        scales = self.scales[:A].to(x.dtype)
        # level-major rows m = level * N + point: every op below runs over contiguous runs of N
        pos = x.clamp(0.0, 1.0).t().contiguous()[:, None, :] * scales[:, None] + 0.5  # (3, A, N), contiguous
        g = torch.floor(pos)
        f = (pos - g).reshape(3, A * N)  # fractional position, carries d/dx
        idx = self.corner_indices(g.long()).reshape(8, A * N)
        res = _Trilinear.apply(self.params, idx, f, scales.repeat_interleave(N), with_jacobian)
        val, jac = res if with_jacobian else (res, None)
        enc = val.view(F_, A, N).permute(2, 1, 0).reshape(N, A * F_)  # column = level * F + feature
        if A < L and pad_inactive:
            enc = torch.cat([enc, enc.new_zeros(N, (L - A) * F_)], dim=1)
        if jac is None:
            return enc
        jac = jac.view(3, F_, A, N).permute(0, 3, 2, 1).reshape(3, N, A * F_)
        if A < L and pad_inactive:
            jac = torch.cat([jac, jac.new_zeros(3, N, (L - A) * F_)], dim=2)
        return enc, jac

    def _forward_tcnn(self, x: Tensor) -> Tensor:
        if _tcnn is None:
            raise RuntimeError("encoding.backend='tcnn' but tinycudann is not importable")
        if not x.is_cuda:
            raise ValueError("the tcnn hash-grid backend needs CUDA inputs; use encoding.backend='torch' on CPU")
        if self._tcnn_native is None:
            c = self.cfg
            module = _tcnn.Encoding(
                3,
                {
                    "otype": "HashGrid",
                    "n_levels": c.n_levels,
                    "n_features_per_level": c.n_features_per_level,
                    "log2_hashmap_size": c.log2_hashmap_size,
                    "base_resolution": c.base_resolution,
                    "per_level_scale": c.per_level_scale,
                },
                dtype=torch.float32,
            )
            n_tcnn = module.params.numel()
            if n_tcnn != self.params.numel():
                raise RuntimeError(
                    f"tcnn HashGrid has {n_tcnn} parameters, the torch layout {self.params.numel()}: "
                    "the level layouts disagree"
                )
            # keep tcnn's native object only (its own Parameter stays unregistered: ours is used)
            native = module.native_tcnn_module
            self._tcnn_native = (native, _tcnn_precision(native.param_precision()), getattr(module, "loss_scale", 1.0))
        native, precision, loss_scale = self._tcnn_native
        n = x.shape[0]
        gran = int(_tcnn_modules._C.batch_size_granularity())
        padded = (n + gran - 1) // gran * gran
        xp = x.float().contiguous()
        if padded != n:
            xp = torch.nn.functional.pad(xp, [0, 0, 0, padded - n])
        out = _tcnn_function.apply(native, xp, self.params.t().reshape(-1).to(precision).contiguous(), loss_scale)
        out = out[:n, : self.n_output_dims].to(x.dtype)
        mask = (torch.arange(self.cfg.n_levels, device=x.device) < self.active_levels).to(out.dtype)
        return out * mask.repeat_interleave(self.cfg.n_features_per_level)


def _interpolate(C: Tensor, f: Tensor, with_jacobian: bool) -> tuple[Tensor, Tensor | None]:
    """Separable trilinear interpolation of corner values C (F, 2z, 2y, 2x, M) at fractions f (3, M).

    Returns the value (F, M) and, if asked, d value / d f, (3, F, M).
    """
    fx, fy, fz = f[0], f[1], f[2]
    dx = C[:, :, :, 1] - C[:, :, :, 0]  # (F, 2z, 2y, M)
    ix = C[:, :, :, 0] + fx * dx
    dy = ix[:, :, 1] - ix[:, :, 0]  # (F, 2z, M)
    iy = ix[:, :, 0] + fy * dy
    dz = iy[:, 1] - iy[:, 0]  # (F, M)
    val = iy[:, 0] + fz * dz
    if not with_jacobian:
        return val, None
    dxy = dx[:, :, 0] + fy * (dx[:, :, 1] - dx[:, :, 0])  # (F, 2z, M)
    jx = dxy[:, 0] + fz * (dxy[:, 1] - dxy[:, 0])
    jy = dy[:, 0] + fz * (dy[:, 1] - dy[:, 0])
    return val, torch.stack([jx, jy, dz])


def _scatter_interpolate_grad(
    g_params: Tensor, idx: Tensor, f: Tensor, g_val: Tensor | None, g_jac: Tensor | None
) -> None:
    """Add to g_params (F, T) the gradient w.r.t. the corner values of <g_val, val> + <g_jac, d val/d f>.

    Corner (z, y, x) receives w_z w_y w_x g_val + s_x w_z w_y g_jx + w_z s_y w_x g_jy + s_z w_y w_x g_jz
    with w_0 = 1 - f, w_1 = f, s_0 = -1, s_1 = +1; written per (z, y) pair as
    (w_z w_y) a_x + (w_z s_y) b_x + (s_z w_y) c_x,  a_x = w_x g_val + s_x g_jx, b_x = w_x g_jy,
    c_x = w_x g_jz, and scattered with one index_add per pair (no (F, 8, M) temporary).
    """
    fx, fy, fz = f[0], f[1], f[2]
    ref = g_val if g_val is not None else g_jac[0]
    g = g_val if g_val is not None else torch.zeros_like(ref)
    wx0 = 1.0 - fx
    if g_jac is None:
        a = torch.stack([wx0 * g, fx * g], dim=1)  # (F, 2x, M)
        b = c = None
    else:
        gx, gy, gz = g_jac[0], g_jac[1], g_jac[2]
        a = torch.stack([wx0 * g - gx, fx * g + gx], dim=1)
        b = torch.stack([wx0 * gy, fx * gy], dim=1)
        c = torch.stack([wx0 * gz, fx * gz], dim=1)
    wy, wz = (1.0 - fy, fy), (1.0 - fz, fz)
    sign = (-1.0, 1.0)
    F_, M = a.shape[0], a.shape[-1]
    buf = torch.empty_like(a)
    for z in range(2):
        for y in range(2):
            torch.mul(a, wz[z] * wy[y], out=buf)
            if b is not None:
                buf.add_(b * (sign[y] * wz[z])).add_(c * (sign[z] * wy[y]))
            g_params.index_add_(1, idx[z, y].reshape(-1), buf.view(F_, 2 * M))


class _Trilinear(torch.autograd.Function):
    """Gather the 8 corner columns of ``params`` (F, T) and interpolate, with a hand-written backward.

    Layout is feature/corner major with points innermost, so every op runs over long contiguous rows.
    forward: val (F, M) = sum_c w_c(f) theta[:, idx_c];  jac (3, F, M) = s * d val / d f  (d f/d x = s).
    backward: d/d theta[:, idx_c] += w_c g_val + sum_k s dw_c/df_k g_jac_k   (index_add per corner pair);
              d/d f_k = sum_F g_val * d val / d f_k   (first order only).
    """

    @staticmethod
    def forward(ctx, params: Tensor, idx: Tensor, f: Tensor, row_scale: Tensor, with_jacobian: bool):
        ctx.set_materialize_grads(False)
        M, F_ = f.shape[1], params.shape[0]
        C = params.index_select(1, idx.reshape(-1)).to(f.dtype).view(F_, 2, 2, 2, M)
        need_fgrad = ctx.needs_input_grad[2]
        val, djac = _interpolate(C, f, with_jacobian or need_fgrad)
        ctx.save_for_backward(idx, f, row_scale, djac if need_fgrad else None)
        ctx.params_shape, ctx.params_dtype = params.shape, params.dtype
        if with_jacobian:
            return val, djac * row_scale
        return val

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_val: Tensor | None, g_jac: Tensor | None = None):
        idx, f, row_scale, djac = ctx.saved_tensors
        g_params = g_f = None
        if ctx.needs_input_grad[0] and (g_val is not None or g_jac is not None):
            gj = g_jac * row_scale if g_jac is not None else None
            g_params = torch.zeros(ctx.params_shape, dtype=ctx.params_dtype, device=f.device)
            # int64 indices: CPU index_add_ with int32 indices takes a ~30x slower path
            _scatter_interpolate_grad(g_params, idx.long().view(2, 2, 2, -1), f, g_val, gj)
        if ctx.needs_input_grad[2] and g_val is not None:
            g_f = (g_val[None] * djac).sum(1)  # (3, M)
        return g_params, None, g_f, None, None
