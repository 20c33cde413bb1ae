"""Loading a CLIP model for the metrics, offline, as a (feature model, processor) pair.

torchmetrics' ``CLIPScore`` / ``CLIPImageQualityAssessment`` accept ``model_name_or_path`` as a
callable returning ``(model, processor)`` where ``model.get_image_features(pixel_values)`` and
``model.get_text_features(input_ids, attention_mask)`` return feature *tensors* and
``processor(images=[(3,H,W), ...])`` / ``processor(text=[...])`` return ``pixel_values`` /
``input_ids`` + ``attention_mask``. We always use that form because

* with transformers >= 5 the string form breaks (``get_*_features`` return a
  ``BaseModelOutputWithPooling``; torchmetrics 1.9 calls ``.norm`` on it);
* the string form only accepts names containing "openai" / "jinaai" / "zer0int" and downloads;
* the input range has to be pinned down: HF's CLIP image processor rescales by 1/255, so images
  already in [0, 1] would be rescaled twice (the metric would see near-black images).

Input convention of every processor here: **float images in [0, 1]** (after the metric's own
division by ``data_range``; we use ``data_range=1.0``). The HF processor is called with
``do_rescale=False``; values outside [0, 1] raise instead of being silently rescaled.

Model specs (``--clip-model``):

    openai/clip-vit-base-patch16          HF hub id, loaded from the local HF cache only
    /path/to/clip-vit-base-patch16        a directory written by save_pretrained / huggingface-cli download
    open_clip:ViT-B-16:/path/to/ckpt.bin  open_clip architecture + local checkpoint file
    open_clip:ViT-B-16:openai             open_clip pretrained tag (must already be in the local cache)
    open_clip:ViT-B-16:none               random weights (smoke tests only; loudly flagged)
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from eval.runs import DEFAULT_CLIP_MODEL, EvalError

OPEN_CLIP_PREFIX = "open_clip:"


class ClipModelNotFound(EvalError):
    pass


def _looks_like_hub_id(spec: str) -> bool:
    return (
        not os.path.isabs(spec) and not spec.startswith((".", "~")) and spec.count("/") == 1 and not Path(spec).exists()
    )


def _how_to_get(spec: str) -> str:
    hub_id = spec if _looks_like_hub_id(spec) else DEFAULT_CLIP_MODEL
    name = hub_id.rsplit("/", 1)[-1]
    return (
        f"Get it on a machine with internet access:\n"
        f"    huggingface-cli download {hub_id} --local-dir {name}\n"
        f"(or `hf download {hub_id} --local-dir {name}`), copy that directory here and pass "
        f"`--clip-model /path/to/{name}`, or populate the Hugging Face cache (HF_HOME) with it. "
        f"The evaluator never downloads unless --allow-download is given."
    )


def check_image_range(images: Sequence[Tensor] | Tensor, where: str = "CLIP processor") -> None:
    """Float images must lie in [0, 1]; anything else is a caller bug (e.g. [0, 255] passed)."""
    items = [images] if isinstance(images, Tensor) else list(images)
    for img in items:
        if not torch.is_floating_point(img):
            raise ValueError(
                f"{where}: expected float images in [0, 1], got dtype {img.dtype}; convert uint8 with img.float() / 255"
            )
        lo, hi = float(img.min()), float(img.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3 or hi != hi:
            raise ValueError(
                f"{where}: expected images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                + (" (looks like [0, 255]; divide by 255 once)" if hi > 1.5 else "")
            )


class _TruncationWarner:
    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, text: str, n_tokens: int, limit: int) -> None:
        if text in self.warned:
            return
        self.warned.add(text)
        warnings.warn(
            f"prompt {text!r} has {n_tokens} tokens, more than the CLIP text encoder's limit of "
            f"{limit}: it is truncated to {limit} tokens (end-of-text token kept)",
            UserWarning,
            stacklevel=3,
        )


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers CLIP
# ----------------------------------------------------------------------------------------------
class HFClipFeatures(nn.Module):
    """Wraps ``transformers.CLIPModel`` so that ``get_*_features`` return tensors (transformers 4 and 5)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out: Any) -> Tensor:
        if isinstance(out, Tensor):
            return out
        pooled = getattr(out, "pooler_output", None)
        if pooled is None and isinstance(out, (tuple, list)):
            pooled = out[1] if len(out) > 1 else out[0]
        return pooled

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class HFClipProcessor:
    """``CLIPProcessor``-compatible callable with a fixed input convention (see module docstring)."""

    def __init__(self, processor: Any, max_length: int):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.max_length = int(max_length)
        self._warn = _TruncationWarner()

    def __call__(
        self, text: Any = None, images: Any = None, return_tensors: str = "pt", padding: Any = True, **kwargs: Any
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if images is not None:
            imgs = [images] if isinstance(images, Tensor) and images.ndim == 3 else list(images)
            check_image_range(imgs)
            pix = self.image_processor(images=[i.float().cpu() for i in imgs], return_tensors="pt", do_rescale=False)
            out["pixel_values"] = pix["pixel_values"]
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            full = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
            for t, ids in zip(texts, full):
                if len(ids) > self.max_length:
                    self._warn(t, len(ids), self.max_length)
            tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            out["input_ids"] = tok["input_ids"]
            out["attention_mask"] = tok["attention_mask"]
        return out


# ----------------------------------------------------------------------------------------------
# open_clip
# ----------------------------------------------------------------------------------------------
class OpenClipFeatures(nn.Module):
    def __init__(self, model: nn.Module, context_length: int):
        super().__init__()
        self.clip = model
        self.config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=context_length))

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        return self.clip.encode_image(pixel_values)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.clip.encode_text(input_ids)


def resize_center_crop(img: Tensor, size: int | tuple[int, int]) -> Tensor:
    """open_clip's eval transform on a (3,H,W) tensor: bicubic resize of the shortest side, centre crop."""
    import torch.nn.functional as F

    th, tw = (size, size) if isinstance(size, int) else tuple(size)
    _, h, w = img.shape
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
        img = img.clamp(0.0, 1.0)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return img[:, top : top + th, left : left + tw]


class OpenClipProcessor:
    def __init__(
        self,
        tokenizer: Callable,
        image_size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        context_length: int,
    ):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
        self.max_length = int(context_length)
        self._warn = _TruncationWarner()

    def _n_tokens(self, text: str) -> int | None:
        enc = getattr(self.tokenizer, "encode", None)
        if enc is None:
            return None
        try:
            return len(enc(text)) + 2  # + start/end of text
        except Exception:  # noqa: BLE001 - HF-backed tokenizers differ; no warning then
            return None

    def __call__(
        self, text: Any = None, images: Any = None, return_tensors: str = "pt", padding: Any = True, **kwargs: Any
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if images is not None:
            imgs = [images] if isinstance(images, Tensor) and images.ndim == 3 else list(images)
            check_image_range(imgs)
            pix = [(resize_center_crop(i.float().cpu(), self.image_size) - self.mean) / self.std for i in imgs]
            out["pixel_values"] = torch.stack(pix)
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            for t in texts:
                n = self._n_tokens(t)
                if n is not None and n > self.max_length:
                    self._warn(t, n, self.max_length)
            ids = self.tokenizer(texts)
            out["input_ids"] = ids
            out["attention_mask"] = (ids != 0).long()
        return out


@contextlib.contextmanager
def _hub_offline(enabled: bool):
    """huggingface_hub offline mode for the duration (the env var is read only at import time)."""
    if not enabled:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedClip:
    """A loaded CLIP model, ready for torchmetrics' callable ``model_name_or_path``."""

    model: nn.Module  # get_image_features / get_text_features -> tensors
    processor: Any  # images in [0, 1]
    spec: str  # what the user asked for
    backend: str  # "transformers" | "open_clip"
    source: str  # where the weights came from (directory, cache path, checkpoint file)
    random_weights: bool = False

    def loader(self) -> Callable[[], tuple[nn.Module, Any]]:
        return lambda: (self.model, self.processor)

    def describe(self) -> str:
        s = f"{self.spec} [{self.backend}; weights: {self.source}]"
        return s + " (RANDOM WEIGHTS: numbers are meaningless)" if self.random_weights else s

    def as_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "backend": self.backend,
            "source": self.source,
            "random_weights": self.random_weights,
        }


def load_clip(
    spec: str = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu", allow_download: bool = False
) -> LoadedClip:
    """Load ``spec`` (see module docstring) in eval mode on ``device``; never downloads by default."""
    spec = str(spec)
    if spec.startswith(OPEN_CLIP_PREFIX):
        clip = _load_open_clip(spec, allow_download)
    else:
        clip = _load_hf(spec, allow_download)
    clip.model.eval().requires_grad_(False).to(device)
    return clip


def _load_hf(spec: str, allow_download: bool) -> LoadedClip:
    from transformers import CLIPModel, CLIPProcessor

    path = Path(spec).expanduser()
    is_dir = path.is_dir()
    if not is_dir and not _looks_like_hub_id(spec):
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise ClipModelNotFound(
            f"CLIP model directory {spec} {what} (and it is not a hub id like "
            f"{DEFAULT_CLIP_MODEL}).\n{_how_to_get(spec)}"
        )
    if is_dir and not (path / "config.json").is_file():
        raise ClipModelNotFound(
            f"{spec} is a directory but holds no config.json, so it is not a saved CLIP model "
            f"(expected the files of save_pretrained / huggingface-cli download: config.json, "
            f"model.safetensors, tokenizer and preprocessor files).\n{_how_to_get(spec)}"
        )
    local_only = not allow_download or is_dir
    source = str(path.resolve()) if is_dir else spec
    try:
        model = CLIPModel.from_pretrained(str(path) if is_dir else spec, local_files_only=local_only)
        processor = CLIPProcessor.from_pretrained(str(path) if is_dir else spec, local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "directory" if is_dir else "Hugging Face hub id"
        raise ClipModelNotFound(
            f"cannot load CLIP model {spec!r} ({where}) "
            f"{'offline (local_files_only=True)' if local_only else ''}: {str(e).splitlines()[0] if str(e) else e!r}\n"
            f"{_how_to_get(spec)}"
        ) from None
    if not is_dir:
        try:
            from huggingface_hub import snapshot_download

            source = f"{spec} @ {snapshot_download(spec, local_files_only=True)}"
        except Exception:  # noqa: BLE001 - only for the description
            source = f"{spec} (HF cache)"
    limit = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
    tok_limit = getattr(processor.tokenizer, "model_max_length", limit) or limit
    max_length = int(min(limit, tok_limit))
    return LoadedClip(HFClipFeatures(model), HFClipProcessor(processor, max_length), spec, "transformers", source)


def _load_open_clip(spec: str, allow_download: bool) -> LoadedClip:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover
        raise ClipModelNotFound(f"{spec}: open_clip is not installed (pip install open-clip-torch): {e}") from None
    rest = spec[len(OPEN_CLIP_PREFIX) :]
    arch, _, pretrained = rest.partition(":")
    if not arch:
        raise ClipModelNotFound(f"{spec}: expected open_clip:<architecture>[:<checkpoint file | tag | none>]")
    random_weights = pretrained.lower() in ("", "none", "random")
    if random_weights and pretrained == "":
        raise ClipModelNotFound(
            f"{spec}: name the weights, e.g. open_clip:{arch}:/path/to/open_clip_pytorch_model.bin, "
            f"open_clip:{arch}:openai (tag, from the local cache), or open_clip:{arch}:none (random weights)"
        )
    if arch not in open_clip.list_models() and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ClipModelNotFound(f"{spec}: unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    offline = not random_weights and not allow_download and not os.path.isfile(pretrained)
    try:
        with _hub_offline(offline):  # a tag must then come from the local cache
            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=None if random_weights else pretrained)
    except Exception as e:  # noqa: BLE001 - open_clip raises RuntimeError for missing weights
        raise ClipModelNotFound(
            f"cannot load open_clip model {arch} with weights {pretrained!r}: {e}\n"
            f"Pass a local checkpoint file (open_clip:{arch}:/path/to/open_clip_pytorch_model.bin), downloaded "
            f"elsewhere with `huggingface-cli download` of the open_clip weights, or use the default HF model "
            f"(--clip-model /path/to/clip-vit-base-patch16)."
        ) from None
    tokenizer = open_clip.get_tokenizer(arch)
    ctx = int(getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77) or 77)
    pp = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    visual = getattr(model, "visual", model)
    size = pp.get("size") or getattr(visual, "image_size", 224)
    mean = pp.get("mean") or getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = pp.get("std") or getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    if isinstance(size, (list, tuple)) and len(size) == 1:
        size = size[0]
    if random_weights:
        warnings.warn(
            f"{spec}: open_clip model with RANDOM weights: scores are meaningless (smoke tests only)",
            UserWarning,
            stacklevel=2,
        )
    source = (
        "random init"
        if random_weights
        else (str(Path(pretrained).resolve()) if os.path.isfile(pretrained) else f"tag {pretrained}")
    )
    return LoadedClip(
        OpenClipFeatures(model, ctx),
        OpenClipProcessor(tokenizer, size, mean, std, ctx),
        spec,
        "open_clip",
        source,
        random_weights,
    )
