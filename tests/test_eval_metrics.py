"""CLIP score and CLIP-IQA through the evaluator equal a direct computation with the same model.

A tiny random CLIP (tests/tiny_clip.py) is built locally; nothing is downloaded. The direct
computation below does not use any eval code nor the HF image processor: it normalises [0, 1]
images with the saved mean/std itself, so an evaluator that rescaled images twice (the
``do_rescale`` / ``data_range`` pitfall) would not match.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

import pytest  # noqa: E402
import tiny_clip  # noqa: E402
import torch  # noqa: E402

PROMPT = "A car made out of sushi"


@pytest.fixture(scope="module")
def clip_dir() -> Path:
    return tiny_clip.tiny_clip_dir()


@pytest.fixture(scope="module")
def evaluator(clip_dir):
    from eval.metrics import ClipEvaluator

    return ClipEvaluator(str(clip_dir), device="cpu")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 4).view(4, 1, 1, 1).expand(4, 3, 32, 32)
    return torch.cat([torch.rand(6, 3, 32, 32, generator=g), smooth]).contiguous()


class Direct:
    """Reference computation with the same weights, independent of eval.*"""

    def __init__(self, model_dir: Path):
        from transformers import CLIPModel, CLIPTokenizer

        self.model = CLIPModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.tok = CLIPTokenizer.from_pretrained(model_dir, local_files_only=True)
        if (model_dir / "preprocessor_config.json").is_file():  # transformers 4 layout
            pp = json.loads((model_dir / "preprocessor_config.json").read_text())
        else:  # transformers 5: processor_config.json with a nested image_processor
            pp = json.loads((model_dir / "processor_config.json").read_text())["image_processor"]
        self.mean = torch.tensor(pp["image_mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["image_std"]).view(1, 3, 1, 1)

    @staticmethod
    def _t(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def image_features(self, images01: torch.Tensor) -> torch.Tensor:
        f = self._t(self.model.get_image_features(pixel_values=(images01 - self.mean) / self.std))
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        t = self.tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        f = self._t(self.model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
        return f / f.norm(dim=-1, keepdim=True)

    def cosine100(self, images01, prompt) -> torch.Tensor:
        return 100.0 * (self.image_features(images01) @ self.text_features([prompt]).T)[:, 0]

    def clip_score(self, images01, prompt) -> torch.Tensor:
        return self.cosine100(images01, prompt).clamp(min=0.0)

    def iqa(self, images01, pairs: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
        texts = [t for pair in pairs.values() for t in pair]
        logits = 100.0 * self.image_features(images01) @ self.text_features(texts).T
        probs = logits.view(images01.shape[0], len(pairs), 2).softmax(-1)[..., 0]
        return {k: 100.0 * probs[:, i] for i, k in enumerate(pairs)}


@pytest.fixture(scope="module")
def direct(clip_dir) -> Direct:
    return Direct(clip_dir)


CANDIDATE_PROMPTS = [
    PROMPT,
    "A delicious croissant",
    "A small saguaro cactus planted in a clay pot",
    "A plate piled high with chocolate chip cookies",
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow ring",
    "A photo of a dog",
    "An astronaut riding a horse",
]


@pytest.fixture(scope="module")
def mixed_prompt(direct, images) -> str:
    """A prompt whose cosine with the fixture images is positive for some views and negative for
    others (the tiny model is random), so the clamp at 0 is exercised both ways."""
    for p in CANDIDATE_PROMPTS:
        cos = direct.cosine100(images, p)
        if (cos > 1).any() and (cos < -1).any():
            return p
    pytest.fail("no candidate prompt gives mixed-sign cosines with the tiny CLIP; change the seed in tiny_clip.py")


def test_tiny_tokenizer_matches_open_clip(clip_dir):
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    assert tok.model_max_length == 77
    oc = open_clip.get_tokenizer("ViT-B-16")
    for text in (PROMPT, "A DSLR photo of a squirrel's hat, 3D!", "Good photo."):
        ref = oc([text])[0]
        ref = ref[: int((ref != 0).sum())].tolist()
        assert tok(text)["input_ids"] == ref


def test_clip_score_equals_direct(evaluator, direct, images, mixed_prompt):
    ours = evaluator.clip_scores(images, mixed_prompt)
    ref = direct.clip_score(images, mixed_prompt)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-4)
    assert (ours == 0).any() and (ours > 1).any()  # clamped and unclamped views both present
    assert (ours >= 0).all() and (ours <= 100).all()


def test_iqa_equals_direct(evaluator, direct, images):
    from eval.metrics import IQA_PROMPTS

    assert IQA_PROMPTS == {
        "quality": ("Good photo.", "Bad photo."),
        "sharpness": ("Sharp photo.", "Blurry photo."),
        "real": ("Real photo.", "Abstract photo."),
    }
    ours = evaluator.iqa_scores(images)
    ref = direct.iqa(images, IQA_PROMPTS)
    assert list(ours) == ["quality", "sharpness", "real"]
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], atol=2e-3, rtol=1e-4)
        assert ours[k].min() >= 0 and ours[k].max() <= 100  # percent


def test_score_summary_matches_per_view(evaluator, direct, images, mixed_prompt):
    res = evaluator.score(images, mixed_prompt, batch_size=3)  # batching must not change the numbers
    ref = direct.clip_score(images, mixed_prompt)
    torch.testing.assert_close(torch.tensor(res["clip_score"]["per_view"]), ref, atol=2e-3, rtol=1e-4)
    assert res["clip_score"]["mean"] == pytest.approx(float(ref.mean()), abs=2e-3)
    assert res["clip_score"]["std"] == pytest.approx(float(ref.std(unbiased=False)), abs=2e-3)
    assert res["clip_score"]["n"] == images.shape[0]
    assert set(res["iqa"]) == {"quality", "sharpness", "real"}


def test_model_sees_each_image_rescaled_exactly_once(evaluator, direct):
    """The input-range pitfall: [0,1] images must reach the vision tower as (x - mean) / std.

    HF's CLIP processor rescales by 1/255 by default and CLIP-IQA divides by data_range first;
    doing both (or either on [0,1] data) hands the model near-black images. Capture what the
    vision embeddings receive for a white and a mid-grey image, through both metrics.
    """
    seen: list[torch.Tensor] = []
    vision = evaluator.clip.model.clip.vision_model.embeddings
    h = vision.register_forward_pre_hook(
        lambda mod, args, kwargs=None: seen.append(args[0].detach().clone()) if args else None
    )
    try:
        imgs = torch.stack([torch.ones(3, 32, 32), torch.full((3, 32, 32), 0.5)])
        evaluator.clip_scores(imgs, PROMPT)
        evaluator.iqa_scores(imgs)
    finally:
        h.remove()
    assert len(seen) >= 2
    expected = (imgs - direct.mean) / direct.std
    for pix in seen:
        pix = pix.view(-1, 3, 32, 32)
        ref = (
            expected
            if pix.shape[0] == 2
            else expected[:1]
            if torch.allclose(pix, expected[:1], atol=1e-4)
            else expected[1:]
        )
        torch.testing.assert_close(pix, ref, atol=1e-4, rtol=1e-4)
    # and a twice-rescaled white image would be ~ -mean/std: make sure we are far from that
    twice = (imgs / 255.0 - direct.mean) / direct.std
    assert (seen[-1].view(-1, 3, 32, 32) - twice).abs().max() > 1.0


def test_uint8_and_float_inputs_agree_and_255_floats_are_rejected(evaluator, images):
    as_u8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(evaluator.clip_scores(as_u8, PROMPT), evaluator.clip_scores(as_u8.float() / 255, PROMPT))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluator.clip_scores(images * 255, PROMPT)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluator.iqa_scores(images * 255)


def test_long_prompt_is_truncated_with_a_warning(clip_dir, direct, images):
    from eval.metrics import ClipEvaluator

    ev = ClipEvaluator(str(clip_dir))
    long_prompt = "a very detailed photo of a small red wooden toy car " * 12
    assert len(direct.tok(long_prompt)["input_ids"]) > 77
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        ours = ev.clip_scores(images[:3], long_prompt)
    torch.testing.assert_close(ours, direct.clip_score(images[:3], long_prompt), atol=2e-3, rtol=1e-4)
    with warnings.catch_warnings():  # warned once per prompt, not once per view
        warnings.simplefilter("error", UserWarning)
        ev.clip_scores(images[:2], long_prompt)


def test_model_used_is_reported(evaluator, clip_dir):
    info = evaluator.model_info
    assert info["spec"] == str(clip_dir) and info["backend"] == "transformers"
    assert str(clip_dir.name) in evaluator.describe()


def test_missing_model_raises_clear_error(tmp_path):
    from eval.clip_models import ClipModelNotFound, load_clip

    with pytest.raises(ClipModelNotFound, match="huggingface-cli download openai/clip-vit-base-patch16") as e:
        load_clip(str(tmp_path / "no-such-clip"))
    assert "--clip-model" in str(e.value)
    with pytest.raises(ClipModelNotFound, match="huggingface-cli download openai/clip-does-not-exist-sdi"):
        load_clip("openai/clip-does-not-exist-sdi")  # offline: local cache only, no download attempt
    (tmp_path / "empty-openai").mkdir()
    with pytest.raises(ClipModelNotFound, match="no config.json"):
        load_clip(str(tmp_path / "empty-openai"))


def test_open_clip_backend_equals_direct(tmp_path, images):
    import open_clip

    from eval.clip_models import load_clip
    from eval.metrics import ClipEvaluator

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "sdi-eval-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "sdi-eval-tiny.json"))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM"):
        rnd = load_clip("open_clip:sdi-eval-tiny:none")
    ckpt = tmp_path / "tiny_open_clip.pt"
    torch.save(rnd.model.clip.state_dict(), ckpt)
    clip = load_clip(f"open_clip:sdi-eval-tiny:{ckpt}")  # a checkpoint file: the offline route
    assert not clip.random_weights and str(ckpt) in clip.source
    ev = ClipEvaluator(clip)

    model = clip.model.clip
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        fi = model.encode_image((images - mean) / std, normalize=True)
        ft = model.encode_text(open_clip.get_tokenizer("sdi-eval-tiny")([PROMPT]), normalize=True)
    ref = (100 * fi @ ft.T)[:, 0].clamp(min=0)
    torch.testing.assert_close(ev.clip_scores(images, PROMPT), ref, atol=2e-3, rtol=1e-4)
    assert set(ev.iqa_scores(images)) == {"quality", "sharpness", "real"}
