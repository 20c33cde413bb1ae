"""A tiny Stable-Diffusion-shaped pipeline for tests (no download, ever).

:func:`build_tiny_sd` writes, with ``save_pretrained``, a directory that has the layout of
``stabilityai/stable-diffusion-2-1-base`` (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) but with random, tiny weights:

- UNet2DConditionModel: 2 blocks (32, 64 channels), SD-2 style linear projections, cross
  attention of width 32;
- AutoencoderKL with 4 down blocks, so a 512 px render maps to a 4 x 64 x 64 latent (any render
  divisible by 8 works: 64 px -> 8 x 8); its scaling_factor makes latents of unit std, as SD's;
- CLIPTextModel (2 layers, width 32) with the real CLIP vocabulary size;
- CLIPTokenizer built from open_clip's bundled BPE vocabulary (same ids as SD's tokenizer),
  model_max_length 77, pad token "!" as in SD 2.x;
- DDIMScheduler with SD 2.1's scheduler config (scaled_linear 0.00085..0.012, 1000 steps,
  steps_offset 1, set_alpha_to_one False, epsilon prediction).

It loads back through ``StableDiffusionPipeline.from_pretrained(dir)`` and so through
:class:`distill.priors.stable_diffusion.StableDiffusionPrior` exactly as the real weights do.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch

from distill.priors.stable_diffusion import SD21_SCHEDULER

TEXT_DIM = 32


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_vocab(out_dir: str | Path) -> Path:
    """Convert open_clip's bundled BPE file into vocab.json / merges.txt (CLIP's 49408 tokens)."""
    from open_clip.tokenizer import default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def tiny_unet_config(cross_attention_dim: int = TEXT_DIM) -> dict:
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=512,
        scaling_factor=0.18215,
    )


def build_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline into ``out_dir`` and return it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(**tiny_vae_config())
    # like SD's 0.18215 (= 1 / std of its latents): scale the random VAE's latents to unit std, so
    # latents, noise and eps have SD's relative sizes and x0 errors read as they would there
    with torch.no_grad():
        smooth = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8), size=(64, 64), mode="bilinear")
        std = float(vae.encode(smooth * 2 - 1).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    return save_pipeline(out, unet, vae, text_encoder, DDIMScheduler(**SD21_SCHEDULER))


def save_pipeline(out: Path, unet, vae, text_encoder, scheduler) -> Path:
    """Save a StableDiffusionPipeline of these modules (tokenizer from open_clip's vocabulary) into ``out``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    vocab_dir = write_clip_vocab(out / "_vocab")
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_dir), model_max_length=77, pad_token="!")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out))
    for f in vocab_dir.iterdir():
        f.unlink()
    vocab_dir.rmdir()
    return out


if __name__ == "__main__":  # python tests/tiny_sd.py /tmp/tiny-sd
    import sys

    print(build_tiny_sd(sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"))
