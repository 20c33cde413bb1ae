"""A tiny random CLIP model for the evaluator tests, built locally (no hub access).

The tokenizer is real: open_clip ships OpenAI's BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``)
inside its package; it is converted here into ``vocab.json`` / ``merges.txt`` for a transformers
``CLIPTokenizer`` (same ids as open_clip's tokenizer; ``model_max_length=77``). The model is a
2-layer, 32-wide ``CLIPModel`` at 32x32 pixels, saved with ``save_pretrained`` together with a
``CLIPProcessor``, in a directory whose name contains "openai" (torchmetrics' string form only
accepts such names).

    python tests/tiny_clip.py OUT_DIR      # write one, e.g. to try `python -m eval score --clip-model OUT_DIR`
"""

from __future__ import annotations

import atexit
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGE_SIZE = 32
VOCAB_SIZE = 49408
MAX_LENGTH = 77
_CACHE: dict[str, Path] = {}


def write_clip_tokenizer_files(out_dir: Path | str) -> tuple[Path, Path]:
    """vocab.json + merges.txt of OpenAI's CLIP BPE, converted from open_clip's bundled vocabulary."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # as open_clip's SimpleTokenizer and OpenAI's CLIP
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_tiny_clip(out_dir: Path | str, seed: int = 2, image_size: int = IMAGE_SIZE) -> Path:
    """Build and ``save_pretrained`` a tiny CLIPModel + CLIPProcessor into ``out_dir``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out_dir = Path(out_dir)
    tok_dir = out_dir / "_tokenizer_src"
    vocab_path, merges_path = write_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=MAX_LENGTH)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=image_size,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    shutil.rmtree(tok_dir, ignore_errors=True)
    return out_dir


def tiny_clip_dir() -> Path:
    """A tiny CLIP directory built once per test process (``.../tiny-openai-clip``)."""
    if "dir" not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix="sdi-eval-tiny-clip-"))
        atexit.register(shutil.rmtree, root, True)
        _CACHE["dir"] = build_tiny_clip(root / "tiny-openai-clip")
    return _CACHE["dir"]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/tiny_clip.py OUT_DIR")
    print(build_tiny_clip(sys.argv[1]))
