"""The Stable Diffusion phi of VSD / ESD: a UNet + LoRA + camera embedding (threestudio's ProlificDreamer guidance).

    f_phi(x_t, t, y, c) = UNet_{W + B A}(x_t, t, y; class_labels = c)
- LoRA (peft, through diffusers' ``unet.add_adapter``): rank 4, alpha 4 (scale 1), on every attention's to_q, to_k,
  to_v and to_out.0; "gaussian" init, A ~ N(0, 1/r^2), B = 0, so the LoRA starts as a no-op (checked at build).
  The LoRA tensors are kept in fp32 (peft casts the input), the frozen base in the prior's dtype.
- camera embedding: diffusers' ``TimestepEmbedding(16, time_embed_dim)`` (Linear, SiLU, Linear; 1.66 M params for
  SD 2.x) on the flattened c2w, installed as the UNet's ``class_embedding`` and so added to the time embedding. The
  null camera is the zero vector, whose embedding W2 SiLU(b1) + b2 is learned by the camera dropout. Torch's default
  init as the reference (phi then starts as the base model perturbed by the camera term), or a zero output layer
  (``phi.zero_init_camera``: phi starts exactly as the base model).
- phi's UNet is a second model (``phi.model``, reference SD 2.1 768-v, v-prediction; loaded with the prior's own
  hub-id-or-local-path / offline / clear-error logic) or, with ``phi.single_model``, the prior's UNet itself: the
  LoRA and the camera embedding are then switched on only inside phi's calls, so the prior's pretrained branch runs
  the plain UNet.
Cost: phi's eps is one UNet call (1 row VSD, 2 rows ESD, no grad); its train step one call with backward (1 row).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from distill.config import ConfigError
from distill.phi.base import CAMERA_DIM, Phi, PhiConfig, camera_features
from distill.priors.base import PriorError

PEFT_HINT = 'pip install peft (or pip install -e ".[vsd]")'
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
_names = itertools.count()


def require_peft():
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ConfigError(
            f"guidance=vsd / esd on a Stable Diffusion prior attaches LoRA to phi's UNet with peft, which is not "
            f"importable ({e}); install it: {PEFT_HINT}"
        ) from e
    return LoraConfig


class LoRAPhi(Phi):
    def __init__(self, cfg: PhiConfig, prior):
        from diffusers.models.embeddings import TimestepEmbedding

        from distill.priors.stable_diffusion import StableDiffusionPrior

        cfg.validate()
        LoraConfig = require_peft()
        self.cfg, self.device = cfg, prior.device
        self.shared = cfg.single_model or str(cfg.model) == str(prior.model_id)
        if self.shared:
            unet, self.alphas_cumprod, self.prediction_type = prior.unet, prior.alphas_cumprod, prior.prediction_type
        else:
            # the prior's revision names a commit of ITS repository: phi's model loads at its main branch
            phi_cfg = replace(prior.cfg, model=str(cfg.model), revision=None)
            try:
                pipe = StableDiffusionPrior._load_pipeline(phi_cfg, prior.dtype)
            except PriorError as e:  # the loader names prior.model: say it is phi's
                msg = str(e).replace("run with `prior.model=", "run with `guidance.phi.model=")
                raise PriorError(f"guidance.phi.model={cfg.model!r} (phi's UNet) could not be loaded: {msg}") from e
            unet = pipe.unet.to(prior.device).eval().requires_grad_(False)
            self.alphas_cumprod, self.prediction_type = StableDiffusionPrior._schedule(pipe.scheduler)
            del pipe
            if int(unet.config.cross_attention_dim) != int(prior.unet.config.cross_attention_dim):
                raise PriorError(
                    f"guidance.phi.model={cfg.model!r} has cross_attention_dim {unet.config.cross_attention_dim}, the "
                    f"prior's text embeddings {prior.unet.config.cross_attention_dim}: phi takes the prior's text "
                    f"embeddings, so use a model of the same text encoder (SD 2.1 with 2.1-base)"
                )
            ours, theirs = self.alphas_cumprod, prior.alphas_cumprod.cpu()
            if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-6, rtol=0):
                raise PriorError(
                    f"guidance.phi.model={cfg.model!r} has another noise schedule than the prior: phi is evaluated at "
                    f"the prior's x_t and t, so both must share alpha_bar"
                )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise PriorError(f"phi: prediction_type={self.prediction_type!r} is not supported (epsilon, v_prediction)")
        if unet.class_embedding is not None:
            raise PriorError("phi: the UNet already has a class embedding; the camera embedding needs that slot")
        self.alphas_cumprod = self.alphas_cumprod.to(torch.float64)
        self.unet = unet
        self.adapter = f"phi{next(_names)}"
        dev = torch.device(prior.device)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            lora = LoraConfig(
                r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=TARGETS
            )
            unet.add_adapter(lora, adapter_name=self.adapter)
            width = unet.time_embedding.linear_2.out_features
            self.camera_embedding = TimestepEmbedding(CAMERA_DIM, width).to(dev, torch.float32)
        if cfg.zero_init_camera:
            with torch.no_grad():
                self.camera_embedding.linear_2.weight.zero_()
                self.camera_embedding.linear_2.bias.zero_()
        lora_params = self._lora_params()
        if not lora_params:
            raise PriorError(f"phi: peft attached no LoRA to {TARGETS} of the UNet")
        for name, p in lora_params:
            p.data = p.data.float()
            if ".lora_B." in name and bool(p.detach().abs().max() > 0):
                raise PriorError(f"phi: peft's gaussian init left {name} non-zero: the LoRA would not start as a no-op")
        if self.shared:
            unet.disable_adapters()  # the prior's own (pretrained) calls see the plain UNet
        else:
            unet.class_embedding = self.camera_embedding
        self.unet_calls = self.unet_rows = self._depth = 0
        self._make_optimizer()

    def _lora_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        tag = f".{self.adapter}."
        return [(n.replace(tag, ".phi."), p) for n, p in self.unet.named_parameters() if tag in n]

    def named_trainables(self) -> list[tuple[str, torch.nn.Parameter]]:
        cam = [(f"camera_embedding.{n}", p) for n, p in self.camera_embedding.named_parameters()]
        return self._lora_params() + cam

    @contextmanager
    def active(self):
        """LoRA and camera embedding on (always on for a separate phi UNet). Re-entrant: the train step keeps them on
        through its backward, since peft's disable also clears the LoRA tensors' requires_grad."""
        if not self.shared or self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.unet.enable_adapters()
        self.unet.set_adapter(self.adapter)
        self.unet.class_embedding = self.camera_embedding
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            self.unet.class_embedding = None
            self.unet.disable_adapters()

    def model_output(self, x_t: Tensor, t: Tensor, embeddings: Tensor, cameras, null: Tensor | None) -> Tensor:
        N, dtype = x_t.shape[0], self.unet.conv_in.weight.dtype  # the base's (LoRA tensors are fp32)
        feat = camera_features(cameras, N, null, self.device)
        with self.active():
            out = self.unet(
                x_t.to(self.device, dtype),
                t.to(self.device),
                encoder_hidden_states=embeddings.to(self.device, dtype),
                class_labels=feat,
            ).sample
        self.unet_calls += 1
        self.unet_rows += N
        return out
