"""Stable Diffusion 2.1 (or any SD-architecture diffusers pipeline) as a frozen eps prior.

    x0 = encode(render)     VAE latent (posterior sample or mean) * scaling_factor, with gradient
    eps(x_t, t, emb)        one batched UNet call over all rows (CFG / Perp-Neg rows included)
    embed_prompts(prompts)  CLIP text encoder last hidden state (N, 77, dim), cached on disk

Classifier-free guidance and Perp-Neg are *not* done here: :func:`distill.guidance.guided_eps`
stacks [cond; uncond; negatives...] and makes one ``eps`` call.

Weights are loaded with ``StableDiffusionPipeline.from_pretrained`` from a hub id (default
``stabilityai/stable-diffusion-2-1-base``, 4 x 64 x 64 latents from 512 px renders) or a local
directory with the same layout (``huggingface-cli download ... --local-dir DIR``). Nothing is
ever downloaded when ``HF_HUB_OFFLINE=1`` or ``prior.local_files_only=true``; missing weights
raise :class:`PriorError` at construction, saying how to fetch them.

Models of ``prediction_type`` ``v_prediction`` (stabilityai/stable-diffusion-2-1, 768 px) and
``sample`` are converted to eps inside :meth:`StableDiffusionPrior.eps`, so the rest of the code
only ever sees eps.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.priors.base import DiffusionPrior, PriorError, scaled_linear_alphas_cumprod

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_ATTENTION = ("sdpa", "slicing", "eager", "xformers")
# stabilityai/stable-diffusion-2-1-base scheduler/scheduler_config.json (as a DDIM scheduler)
SD21_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE / DIFFUSERS_OFFLINE) asks for no network.

    Read at call time, not at import time as huggingface_hub does, so a test or a launcher that
    sets the variable late is still honoured.
    """
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    )


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA, fp32 elsewhere; otherwise fp32 / fp16 / bf16."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if key not in _DTYPES:
        raise PriorError(f"prior.dtype={name!r} is not one of auto, fp32, fp16, bf16")
    return _DTYPES[key]


def fetch_hint(model: str) -> str:
    repo = model if not _looks_like_path(model) else DEFAULT_MODEL
    return (
        f"Fetch the weights on a machine with internet access: `huggingface-cli download {repo}` "
        f"(or `hf download {repo}`) and copy the Hugging Face cache (HF_HOME, default "
        f"~/.cache/huggingface) here, or download into a folder with `huggingface-cli download {repo} "
        f"--local-dir /path/to/dir` and run with `prior.model=/path/to/dir`."
    )


def _pick_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(model) or model.count("/") > 1


class StableDiffusionPrior(DiffusionPrior):
    """Frozen Stable Diffusion UNet + VAE + CLIP text encoder behind :class:`DiffusionPrior`.

    Build with ``StableDiffusionPrior(StableDiffusionPrior.Config(...), device="cuda")`` or, as
    Hydra's ``instantiate`` does with ``conf/prior/sd21.yaml``, with the Config fields as keyword
    arguments (``StableDiffusionPrior(model=..., dtype="fp16", device="cuda")``).

    Attributes beyond the base class: ``unet``, ``vae``, ``text_encoder`` (frozen, eval mode),
    ``tokenizer``, ``dtype`` (weights and UNet/VAE compute dtype), ``prediction_type``,
    ``scaling_factor``, ``model_id`` and the counters ``unet_calls`` / ``unet_rows``
    (``reset_counters()``), which tests and benchmarks read.
    """

    view_dependent = True

    @dataclass
    class Config:
        # hub id ("stabilityai/stable-diffusion-2-1-base") or a local diffusers directory
        model: str = DEFAULT_MODEL
        revision: str | None = None  # hub branch / tag / commit; None = main
        variant: str | None = None  # e.g. "fp16" to load the half-precision files of the repo
        # never touch the network; None = follow HF_HUB_OFFLINE
        local_files_only: bool | None = None
        hf_cache_dir: str | None = None  # Hugging Face cache; None = HF_HOME / default
        dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
        # renders are resized (bilinear) to resolution x resolution before the VAE; 0 = keep size
        resolution: int = 512
        # sdpa (torch's fused kernels) | slicing (sliced attention: least memory, slower) | eager | xformers
        attention: str = "sdpa"
        channels_last: bool = False
        torch_compile: bool = False  # torch.compile the UNet
        compile_mode: str = "default"  # default | reduce-overhead | max-autotune
        # VAE-encoder gradient checkpointing (the 512 px encode with grad holds most activation
        # memory), VAE batch slicing, text encoder kept on the CPU (fp32); combine with
        # attention=slicing for the least memory
        low_memory: bool = False
        # VAE gradient checkpointing alone (implied by low_memory): the encoder's down blocks are
        # recomputed in the backward of encode; same latents and gradients, less activation memory
        vae_checkpointing: bool = False
        vae_posterior: str = "sample"  # sample (official / threestudio) | mean
        # on-disk text-embedding cache (keyed by model, revision, weights, prompt); null = off
        embedding_cache_dir: str | None = "~/.cache/sdi-lab/text_embeddings"

        def validate(self) -> None:
            if str(self.dtype).lower() != "auto" and str(self.dtype).lower() not in _DTYPES:
                raise PriorError(f"prior.dtype={self.dtype!r} is not one of auto, fp32, fp16, bf16")
            if self.attention not in _ATTENTION:
                raise PriorError(f"prior.attention={self.attention!r} is not one of {list(_ATTENTION)}")
            if self.vae_posterior not in ("sample", "mean"):
                raise PriorError(f"prior.vae_posterior={self.vae_posterior!r} must be 'sample' or 'mean'")
            if self.resolution is not None and (self.resolution < 0 or self.resolution % 8):
                raise PriorError(
                    f"prior.resolution={self.resolution} must be 0 (keep the render size) or a "
                    f"positive multiple of 8 (512 for SD 2.1-base)"
                )
            if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
                raise PriorError(f"prior.compile_mode={self.compile_mode!r} is not a torch.compile mode")

    def __init__(
        self, cfg: StableDiffusionPrior.Config | None = None, device: str | torch.device | None = None, **overrides: Any
    ):
        cfg = self._make_config(cfg, overrides)
        cfg.validate()
        dev = _pick_device(device)
        dtype = resolve_dtype(cfg.dtype, dev)
        pipe = self._load_pipeline(cfg, dtype)
        self._setup(cfg, dev, dtype, pipe.unet, pipe.vae, pipe.scheduler, pipe.text_encoder, pipe.tokenizer)

    @classmethod
    def from_components(
        cls,
        unet,
        vae,
        scheduler=None,
        text_encoder=None,
        tokenizer=None,
        cfg: StableDiffusionPrior.Config | None = None,
        device: str | torch.device | None = None,
        **overrides: Any,
    ) -> StableDiffusionPrior:
        """Wrap diffusers modules that are already built (benchmarks with random weights, custom
        checkpoints). ``scheduler`` defaults to SD 2.1's DDIM config; without a text encoder
        ``embed_prompts`` raises and embeddings must be passed to ``eps`` directly. The modules
        are cast to the configured dtype and device in place."""
        cfg = cls._make_config(cfg, overrides)
        cfg.validate()
        dev = _pick_device(device)
        dtype = resolve_dtype(cfg.dtype, dev)
        if scheduler is None:
            from diffusers import DDIMScheduler

            scheduler = DDIMScheduler(**SD21_SCHEDULER)
        self = cls.__new__(cls)
        for m in (unet, vae, text_encoder):
            if m is not None and next(m.parameters()).dtype != dtype:
                m.to(dtype=dtype)
        self._setup(cfg, dev, dtype, unet, vae, scheduler, text_encoder, tokenizer)
        return self

    def _setup(self, cfg, dev, dtype, unet, vae, scheduler, text_encoder, tokenizer) -> None:
        alphas_cumprod, prediction_type = self._schedule(scheduler)
        DiffusionPrior.__init__(self, alphas_cumprod)
        self.cfg = cfg
        self.prediction_type = prediction_type
        self.model_id = cfg.model
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler.config)
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        for m in self._networks():
            m.requires_grad_(False)
            m.eval()
        self.scaling_factor = float(self.vae.config.scaling_factor)
        shift = getattr(self.vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.max_length = 77
        if tokenizer is not None and text_encoder is not None:
            self.max_length = int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))

        self.to(dev)
        if cfg.low_memory and text_encoder is not None:
            # the text is embedded once (and cached): keep the encoder off the GPU
            self.text_encoder.to("cpu", torch.float32)
        self._configure_attention(cfg)
        if cfg.low_memory or cfg.vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        if cfg.low_memory:
            self.vae.use_slicing = True
        if cfg.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        # the compiled callable is kept out of the module tree (no duplicate parameters)
        self.__dict__["_unet_call"] = (
            torch.compile(self.unet, mode=cfg.compile_mode) if cfg.torch_compile else self.unet
        )
        self._memory_cache: dict[str, Tensor] = {}
        self._fingerprint: str | None = None
        self.reset_counters()

    def _networks(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder) if m is not None]

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def _make_config(cls, cfg: Any, overrides: dict[str, Any]) -> StableDiffusionPrior.Config:
        names = {f.name for f in fields(cls.Config)}
        overrides = {k: v for k, v in overrides.items() if k != "_target_"}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise PriorError(f"unknown prior option(s) {unknown}; StableDiffusionPrior.Config has {sorted(names)}")
        if cfg is None:
            cfg = cls.Config()
        elif not isinstance(cfg, cls.Config):  # a dict / DictConfig
            items = {k: v for k, v in dict(cfg).items() if k != "_target_"}
            bad = sorted(set(items) - names)
            if bad:
                raise PriorError(f"unknown prior option(s) {bad}; StableDiffusionPrior.Config has {sorted(names)}")
            cfg = cls.Config(**items)
        return replace(cfg, **overrides)

    @staticmethod
    def _load_pipeline(cfg: StableDiffusionPrior.Config, dtype: torch.dtype):
        try:
            from diffusers import StableDiffusionPipeline
        except Exception as e:  # noqa: BLE001 - report any import failure the same way
            raise PriorError(f"prior=sd21 needs diffusers and transformers importable: {type(e).__name__}: {e}") from e

        offline = cfg.local_files_only if cfg.local_files_only is not None else hub_offline()
        model = str(cfg.model)
        local = Path(os.path.expanduser(model))
        if local.exists():
            if not local.is_dir() or not (local / "model_index.json").is_file():
                raise PriorError(
                    f"prior.model={model!r} exists but is not a diffusers pipeline directory (no "
                    f"model_index.json). {fetch_hint(model)}"
                )
            source = str(local.resolve())
        elif _looks_like_path(model):
            raise PriorError(f"prior.model={model!r}: no such local directory. {fetch_hint(model)}")
        else:
            source = model

        kwargs: dict[str, Any] = dict(
            revision=cfg.revision,
            variant=cfg.variant,
            local_files_only=offline,
            cache_dir=cfg.hf_cache_dir,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        kwargs[_dtype_kwarg()] = dtype
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - hub / diffusers raise many types; re-raise one clearly
            where = (
                "the local directory"
                if source != model or local.exists()
                else ("the local Hugging Face cache (offline)" if offline else "the Hugging Face hub")
            )
            raise PriorError(
                f"could not load Stable Diffusion weights prior.model={model!r} "
                f"(revision={cfg.revision!r}, variant={cfg.variant!r}) from {where}: "
                f"{type(e).__name__}: {str(e).strip()[:400].rstrip('.')}. {fetch_hint(model)}"
            ) from e
        missing = [
            n for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None
        ]
        if missing:
            raise PriorError(f"prior.model={model!r} loaded without {missing}. {fetch_hint(model)}")
        return pipe

    @staticmethod
    def _schedule(scheduler) -> tuple[Tensor, str]:
        """alpha_bar in float64 from the scheduler's config (its own tensor is float32)."""
        c = scheduler.config
        T = int(c.num_train_timesteps)
        if c.get("trained_betas") is not None:
            betas = torch.as_tensor(c.trained_betas, dtype=torch.float64)
            ac = torch.cumprod(1.0 - betas, 0)
        elif c.beta_schedule == "scaled_linear":
            ac = scaled_linear_alphas_cumprod(T, c.beta_start, c.beta_end)
        elif c.beta_schedule == "linear":
            ac = torch.cumprod(1.0 - torch.linspace(c.beta_start, c.beta_end, T, dtype=torch.float64), 0)
        else:
            ac = scheduler.alphas_cumprod.to(torch.float64)
        ref = getattr(scheduler, "alphas_cumprod", None)
        if ref is not None and not torch.allclose(ac, ref.to(torch.float64), atol=1e-5, rtol=0):
            ac = ref.to(torch.float64)  # a schedule we did not re-derive correctly: trust diffusers
        pred = c.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction", "sample"):
            raise PriorError(f"scheduler prediction_type={pred!r} is not supported (epsilon, v_prediction, sample)")
        return ac, pred

    def _configure_attention(self, cfg: StableDiffusionPrior.Config) -> None:
        if cfg.attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
            self.vae.set_attn_processor(AttnProcessor())
        elif cfg.attention == "xformers":
            try:
                self.unet.enable_xformers_memory_efficient_attention()
                self.vae.enable_xformers_memory_efficient_attention()
            except Exception as e:  # noqa: BLE001
                raise PriorError(f"prior.attention=xformers is not available: {e}; use prior.attention=sdpa") from e
        if cfg.attention == "slicing":  # SDPA is already memory-efficient: slicing mostly costs time
            self.unet.set_attention_slice("auto")

    # ------------------------------------------------------------------ nn.Module behaviour
    def train(self, mode: bool = True) -> StableDiffusionPrior:
        """The networks stay in eval mode whatever the caller asks (they are frozen)."""
        super().train(mode)
        for m in self._networks():
            m.eval()
        return self

    def _apply(self, fn, recurse: bool = True):
        # keep the text encoder where low_memory put it (CPU, fp32) when the prior is moved
        if (
            getattr(self, "cfg", None) is not None
            and self.cfg.low_memory
            and self._modules.get("text_encoder") is not None
        ):
            te = self._modules.pop("text_encoder")
            try:
                return super()._apply(fn, recurse)
            finally:
                self._modules["text_encoder"] = te
        return super()._apply(fn, recurse)

    def reset_counters(self) -> None:
        self.unet_calls = 0
        self.unet_rows = 0

    # ------------------------------------------------------------------ DiffusionPrior API
    def _resize(self, images: Tensor) -> Tensor:
        res = self.cfg.resolution
        if res and tuple(images.shape[-2:]) != (res, res):
            images = F.interpolate(images, (res, res), mode="bilinear", align_corners=False)
        elif not res and (images.shape[-1] % 8 or images.shape[-2] % 8):
            raise PriorError(
                f"render size {tuple(images.shape[-2:])} must be a multiple of 8 with "
                f"prior.resolution=0; set prior.resolution=512"
            )
        return images

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) RGB in [0, 1] -> (B, 4, res/8, res/8) latents, differentiable in images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise PriorError(f"encode expects (B, 3, H, W) RGB in [0, 1], got shape {tuple(images.shape)}")
        out_dtype = images.dtype if images.dtype.is_floating_point else torch.float32
        x = self._resize(images.to(self.device, torch.float32)) * 2.0 - 1.0
        x = x.to(self.dtype)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if self.cfg.vae_posterior == "sample" else posterior.mean
        return ((z - self.shift_factor) * self.scaling_factor).to(out_dtype)

    def decode(self, x0: Tensor) -> Tensor:
        """Latents -> (B, 3, 8h, 8w) RGB in [0, 1]."""
        z = x0.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        img = self.vae.decode(z).sample
        return (img.float() * 0.5 + 0.5).clamp(0.0, 1.0).to(x0.dtype if x0.dtype.is_floating_point else torch.float32)

    def eps(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras: Any | None = None) -> Tensor:
        """One batched UNet call over N rows; returns eps (converted if the model predicts v / x0).

        Gradient mode is the caller's: wrap in ``torch.no_grad()`` for the SDS/SDI target; the
        weights are frozen, so gradients (if asked for) flow only to x_t / embeddings.
        """
        N = x_t.shape[0]
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(N)
        t = t.long()
        if t.shape[0] != N or embeddings.shape[0] != N:
            raise PriorError(
                f"eps: x_t has {N} rows, t {t.shape[0]}, embeddings {embeddings.shape[0]}: they must match"
            )
        x = x_t.to(self.device, self.dtype)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = embeddings.to(self.device, self.dtype)
        out = self._unet_call(x, t, encoder_hidden_states=emb).sample
        self.unet_calls += 1
        self.unet_rows += N
        out_dtype = x_t.dtype if x_t.dtype.is_floating_point else torch.float32
        out = out.to(out_dtype)
        if self.prediction_type == "epsilon":
            return out
        ab = self.alpha_bar(t).to(out_dtype).view(N, *([1] * (x_t.dim() - 1)))
        xt = x_t.to(self.device, out_dtype)
        if self.prediction_type == "v_prediction":  # eps = sqrt(ab) v + sqrt(1 - ab) x_t
            return ab.sqrt() * out + (1.0 - ab).sqrt() * xt
        return (xt - ab.sqrt() * out) / (1.0 - ab).sqrt()  # "sample": out is x0

    # ------------------------------------------------------------------ text
    def weights_fingerprint(self) -> str:
        """A short hash of the text encoder's (small) position-embedding and final-norm weights."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            sd = self.text_encoder.state_dict()
            for name in sorted(sd):
                if "position_embedding" in name or "final_layer_norm" in name:
                    h.update(name.encode())
                    h.update(sd[name].detach().float().cpu().numpy().tobytes())
            h.update(str(sorted(self.tokenizer.get_vocab().items())[:64]).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def embedding_key(self, prompt: str) -> str:
        te_dtype = str(next(self.text_encoder.parameters()).dtype)
        key = json.dumps(
            [
                self.model_id,
                self.cfg.revision,
                self.cfg.variant,
                te_dtype,
                self.max_length,
                self.weights_fingerprint(),
                prompt,
            ]
        )
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def _cache_dir(self) -> Path | None:
        d = self.cfg.embedding_cache_dir
        return Path(os.path.expanduser(str(d))) if d else None

    @torch.no_grad()
    def embed_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> (N, 77, dim) float32 last hidden states of the CLIP text encoder."""
        if self.text_encoder is None or self.tokenizer is None:
            raise PriorError(
                "this StableDiffusionPrior was built without a text encoder/tokenizer "
                "(from_components); pass embeddings to eps() directly"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise PriorError(f"embed_prompts expects strings, got {p!r}")
        out: list[Tensor | None] = [None] * len(prompts)
        todo: dict[str, list[int]] = {}
        cache_dir = self._cache_dir()
        for i, p in enumerate(prompts):
            key = self.embedding_key(p)
            if key not in self._memory_cache and cache_dir is not None:
                f = cache_dir / f"{key}.pt"
                if f.is_file():
                    try:
                        self._memory_cache[key] = torch.load(f, map_location="cpu", weights_only=True)["embedding"]
                    except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed
                        pass
            if key in self._memory_cache:
                out[i] = self._memory_cache[key]
            else:
                todo.setdefault(p, []).append(i)
        if todo:
            new = list(todo)
            tok = self.tokenizer(
                new, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            )
            for p in new:
                n_tok = len(self.tokenizer(p, truncation=False).input_ids)
                if n_tok > self.max_length:
                    warnings.warn(
                        f"prompt {p!r} has {n_tok} tokens; the text encoder sees the first "
                        f"{self.max_length} (including start/end tokens)",
                        stacklevel=2,
                    )
            te_dev = next(self.text_encoder.parameters()).device
            emb = self.text_encoder(tok.input_ids.to(te_dev))[0].float().cpu()
            for j, p in enumerate(new):
                key = self.embedding_key(p)
                self._memory_cache[key] = emb[j].clone()
                for i in todo[p]:
                    out[i] = self._memory_cache[key]
                if cache_dir is not None:
                    self._write_cache(cache_dir, key, p, emb[j])
        return torch.stack(out).to(self.device)  # type: ignore[arg-type]

    def _write_cache(self, cache_dir: Path, key: str, prompt: str, emb: Tensor) -> None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
            torch.save(
                {"embedding": emb.clone(), "prompt": prompt, "model": self.model_id, "revision": self.cfg.revision}, tmp
            )
            os.replace(tmp, cache_dir / f"{key}.pt")  # atomic: concurrent jobs may share the cache
        except OSError as e:
            warnings.warn(f"could not write the text-embedding cache in {cache_dir}: {e}", stacklevel=3)

    # ------------------------------------------------------------------ misc
    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        res = self.cfg.resolution
        h, w = (res, res) if res else (height, width)
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (int(self.vae.config.latent_channels), h // f, w // f)

    def __repr__(self) -> str:  # the default would print every UNet layer
        c = self.cfg
        return (
            f"{type(self).__name__}(model={c.model!r}, dtype={self.dtype}, resolution={c.resolution}, "
            f"attention={c.attention}, "
            f"prediction_type={self.prediction_type}, low_memory={c.low_memory}, device={self.device})"
        )

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.cfg)


def _dtype_kwarg() -> str:
    """diffusers >= 0.36 renamed ``torch_dtype`` to ``dtype`` (the old name warns)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except Exception:  # noqa: BLE001
        return "torch_dtype"
    return "dtype"


__all__ = ["StableDiffusionPrior", "DEFAULT_MODEL", "hub_offline", "fetch_hint", "resolve_dtype"]
