#!/usr/bin/env python
"""Write a random-weight Stable Diffusion pipeline directory that ``prior.model=DIR`` loads (no hub, ever).

    python benchmarks/gpu/make_pipeline.py DIR [--arch sd21-base|tiny] [--device cuda] [--dtype fp16]

sd21-base: the compute shape of stabilityai/stable-diffusion-2-1-base: the UNet and VAE configs of
benchmarks/bench_sd_step.py (865.9 M + 83.7 M parameters) and the OpenCLIP ViT-H/14 text tower as SD 2.1 ships it
(CLIPTextModel, width 1024, 23 layers, 16 heads, MLP 4096, GELU), tokenizer from open_clip's bundled BPE (the same
ids as SD's), SD 2.1's DDIM scheduler. Weights are random (initialised on --device, saved in --dtype), so the
pipeline is right for timing and memory, meaningless for images.

tiny: tests/tiny_sd.py (a few channels; CPU dry runs of benchmarks/gpu/check.sh).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

# stabilityai/stable-diffusion-2-1-base text_encoder/config.json (the fields that shape compute)
SD21_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    projection_dim=512,
    hidden_act="gelu",
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_sd21_base(out: Path, device: str = "cpu", dtype: str = "fp16", seed: int = 0) -> Path:
    from bench_sd_step import SCHEDULER_CONFIG, UNET_CONFIG, VAE_CONFIG
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from tiny_sd import save_pipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU takes seconds, not minutes
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD21_TEXT))
    for m in (unet, vae, text_encoder):
        m.to(DTYPES[dtype])
    return save_pipeline(out, unet, vae, text_encoder, DDIMScheduler(**SCHEDULER_CONFIG))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", default="sd21-base", choices=["sd21-base", "tiny"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=list(DTYPES), help="dtype of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.arch == "tiny":
        from tiny_sd import build_tiny_sd

        build_tiny_sd(a.out, seed=a.seed)
    else:
        build_sd21_base(a.out, a.device, a.dtype, a.seed)
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    info = dict(dir=str(a.out), arch=a.arch, seconds=time.perf_counter() - t0, size_mb=size / 2**20)
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
