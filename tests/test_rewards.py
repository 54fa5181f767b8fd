"""Reward models and Semantic Relative Preference (SRPO_SPEC.md section 4), on the tiny reward world.

Expected values are computed here independently of rewards/: hand-written control-word tables,
explicit dot products, and the underlying open_clip / transformers models called directly on
torchvision-preprocessed images.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from rewards import (
    RewardCheckpointError,
    clip_preprocess,
    control_prompt,
    control_words,
    load_reward_model,
    semantic_relative_preference,
    srp_score,
)
from rewards.hf_clip import HFCLIPReward
from rewards.hps import HPSv2Reward
from rewards.tiny import make_tiny_hf_clip, make_tiny_hps

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# The reward code runs the same fp32 ops as the direct model calls below; allow for op-order noise only.
TOL = dict(rtol=1e-5, atol=1e-6)


def torchvision_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    tf = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(size),
            T.Normalize(MEAN, STD),
        ]
    )
    return torch.stack([tf(img) for img in images])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_rewards")


@pytest.fixture(scope="module")
def tiny_hps_files(tiny_dir) -> dict:
    return make_tiny_hps(tiny_dir / "hps", seed=0)


@pytest.fixture(scope="module")
def tiny_clip_dir(tiny_dir) -> Path:
    return make_tiny_hf_clip(tiny_dir / "clip", seed=0)


@pytest.fixture()
def hps(tiny_hps_files) -> HPSv2Reward:
    return load_reward_model("hpsv2", tiny_hps_files["checkpoint"], arch=str(tiny_hps_files["arch"]))


@pytest.fixture(params=["pickscore", "clip"])
def hf(request, tiny_clip_dir) -> HFCLIPReward:
    return load_reward_model(request.param, tiny_clip_dir)


def images(b: int = 3, h: int = 240, w: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


CAPTIONS = ["a red car parked on a street at night", "an astronaut riding a horse", "a bowl of fruit"]


# ---------------------------------------------------------------------------------------------
# Control words and the SRP formula
# ---------------------------------------------------------------------------------------------


def test_control_words_rotate_independently():
    # Written out by hand from the spec's lists: positive cycles with period 4, negative with 5.
    expected = [
        ("Natural-lighting", "Concept art"),  # 0
        ("Detail", "Painting"),  # 1
        ("Detailed", "Anime"),  # 2
        ("Real", "Flat"),  # 3
        ("Natural-lighting", "Oil"),  # 4
        ("Detail", "Concept art"),  # 5
        ("Detailed", "Painting"),  # 6
        ("Real", "Anime"),  # 7
        ("Natural-lighting", "Flat"),  # 8
        ("Detail", "Oil"),  # 9
        ("Detailed", "Concept art"),  # 10
        ("Real", "Painting"),  # 11
        ("Natural-lighting", "Anime"),  # 12
        ("Detail", "Flat"),  # 13
        ("Detailed", "Oil"),  # 14
        ("Real", "Concept art"),  # 15
        ("Natural-lighting", "Painting"),  # 16
        ("Detail", "Anime"),  # 17
        ("Detailed", "Flat"),  # 18
        ("Real", "Oil"),  # 19
        ("Natural-lighting", "Concept art"),  # 20: the pair cycle restarts after lcm(4, 5) = 20
    ]
    assert [control_words(s) for s in range(21)] == expected
    assert control_words(3, positive=["a", "b"], negative=["x"]) == ("b", "x")
    assert control_prompt("Real", "a cat on a mat") == "Real. a cat on a mat"


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_srp_score_forms_match_explicit_dot_products():
    g = torch.Generator().manual_seed(1)
    raw_img, raw_pos, raw_neg = (torch.randn(4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    f_img, f_pos, f_neg = _unit(raw_img), _unit(raw_pos), _unit(raw_neg)
    k = torch.tensor([0.1, 0.25, 0.0, 0.6], dtype=torch.float64)
    scale = 3.7
    for form, formula in [
        ("reference", lambda i, p, n, kk: (1 + kk) * torch.dot(i, p) - torch.dot(i, n)),
        ("cfg", lambda i, p, n, kk: (1 - kk) * torch.dot(i, n) + kk * torch.dot(i, p)),
        ("plain", lambda i, p, n, kk: torch.dot(i, p) - torch.dot(i, n)),
    ]:
        expected = torch.stack([scale * formula(f_img[b], f_pos[b], f_neg[b], k[b]) for b in range(4)])
        got = srp_score(f_img, f_pos, f_neg, k, form=form, scale=scale)
        assert got.shape == (4,)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # HPS reading of the reference form, via cosines of the unnormalised features.
    expected_hps = (1 + k) * F.cosine_similarity(raw_img, raw_pos) - F.cosine_similarity(raw_img, raw_neg)
    torch.testing.assert_close(srp_score(f_img, f_pos, f_neg, k), expected_hps, rtol=1e-12, atol=1e-12)
    # The default form is the reference; a scalar k broadcasts.
    torch.testing.assert_close(
        srp_score(f_img, f_pos, f_neg, 0.2), (1.2 * (f_img * f_pos).sum(-1) - (f_img * f_neg).sum(-1))
    )


def test_srp_score_rejects_unknown_form_and_bad_shapes():
    f = _unit(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"^unknown SRP form 'paper'; valid forms: reference, cfg, plain$"):
        srp_score(f, f, f, torch.zeros(2), form="paper")
    with pytest.raises(ValueError, match=r"f_img, f_pos, f_neg must all be \[B, D\]; got \(2, 8\), \(1, 8\), \(2, 8\)"):
        srp_score(f, f[:1], f, torch.zeros(2))
    with pytest.raises(ValueError, match=r"k must be a scalar or \[B=2\], got \(3,\)"):
        srp_score(f, f, f, torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 256, 320), (1, 3, 180, 200), (1, 3, 224, 224), (1, 3, 225, 301), (2, 3, 500, 230), (1, 3, 227, 224)],
)
def test_clip_preprocess_matches_torchvision(shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    # fp32 default tolerances of assert_close (rtol 1.3e-6, atol 1e-5): the ops are the same.
    torch.testing.assert_close(clip_preprocess(x), torchvision_preprocess(x))
    assert clip_preprocess(x).shape == (shape[0], 3, 224, 224)


def test_clip_preprocess_is_differentiable():
    x = torch.rand(2, 3, 300, 260, requires_grad=True)
    clip_preprocess(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Analytic vs numerical gradient on a small double image (resize 10x13 -> 8, crop 8x8).
    small = torch.rand(1, 3, 10, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: clip_preprocess(t, size=8), (small,))


# ---------------------------------------------------------------------------------------------
# SRP on the tiny HPS (open_clip) and tiny PickScore / CLIP (transformers)
# ---------------------------------------------------------------------------------------------


def _direct_open_clip(files: dict):
    """The tiny HPS model built and loaded directly with open_clip + torch.load."""
    name = Path(files["arch"]).stem
    open_clip.add_model_config(files["arch"])
    model = open_clip.create_model(name, pretrained=None)
    model.load_state_dict(torch.load(files["checkpoint"], weights_only=True)["state_dict"])
    return model.eval(), open_clip.get_tokenizer(name)


def test_srp_on_tiny_hps_matches_direct_open_clip(hps, tiny_hps_files):
    model, tok = _direct_open_clip(tiny_hps_files)
    x = images()
    k = torch.tensor([0.1, 0.2, 0.25])
    pos_word, neg_word = control_words(5)
    with torch.no_grad():
        f_img = F.normalize(model.encode_image(torchvision_preprocess(x)), dim=-1)
        f_pos = F.normalize(model.encode_text(tok([f"{pos_word}. {c}" for c in CAPTIONS])), dim=-1)
        f_neg = F.normalize(model.encode_text(tok([f"{neg_word}. {c}" for c in CAPTIONS])), dim=-1)
    expected = (1 + k) * (f_img * f_pos).sum(-1) - (f_img * f_neg).sum(-1)  # HPS: no logit scale

    assert hps.score_scale == 1.0
    res = semantic_relative_preference(hps, x, CAPTIONS, pos_word, neg_word, k)
    torch.testing.assert_close(res.reward, expected, **TOL)
    torch.testing.assert_close(res.pos_score, (f_img * f_pos).sum(-1), **TOL)
    torch.testing.assert_close(res.neg_score, (f_img * f_neg).sum(-1), **TOL)
    cfg = semantic_relative_preference(hps, x, CAPTIONS, pos_word, neg_word, k, form="cfg")
    torch.testing.assert_close(cfg.reward, (1 - k) * (f_img * f_neg).sum(-1) + k * (f_img * f_pos).sum(-1), **TOL)
    with pytest.raises(ValueError, match=r"got 2 captions for 3 images"):
        semantic_relative_preference(hps, x, CAPTIONS[:2], pos_word, neg_word, k)


def test_srp_on_tiny_hf_clip_matches_direct_transformers(hf, tiny_clip_dir):
    from safetensors.torch import load_file
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(tiny_clip_dir, local_files_only=True, dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip_dir, local_files_only=True)
    # The scale read straight from the weights file, not through the model.
    logit_scale = load_file(str(tiny_clip_dir / "model.safetensors"))["logit_scale"].item()
    scale = math.exp(logit_scale) / 20
    assert hf.score_scale == pytest.approx(scale, rel=1e-6)
    assert hf.score_scale == pytest.approx(5.0, rel=1e-3)  # the tiny world uses PickScore's exp(scale)=100

    def text_feats(texts):
        t = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = model.text_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
        return F.normalize(model.text_projection(pooled), dim=-1)

    x = images(seed=3)
    k = torch.tensor([0.5, 0.1, 0.3])
    pos_word, neg_word = control_words(2)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=torchvision_preprocess(x)).pooler_output
        f_img = F.normalize(model.visual_projection(pooled), dim=-1)
        f_pos = text_feats([f"{pos_word}. {c}" for c in CAPTIONS])
        f_neg = text_feats([f"{neg_word}. {c}" for c in CAPTIONS])
    expected = scale * ((1 + k) * (f_img * f_pos).sum(-1) - (f_img * f_neg).sum(-1))

    res = semantic_relative_preference(hf, x, CAPTIONS, pos_word, neg_word, k)
    torch.testing.assert_close(res.reward, expected, **TOL)
    torch.testing.assert_close(res.pos_score, scale * (f_img * f_pos).sum(-1), **TOL)
    plain = semantic_relative_preference(hf, x, CAPTIONS, pos_word, neg_word, k, form="plain")
    torch.testing.assert_close(plain.reward, scale * ((f_img * f_pos).sum(-1) - (f_img * f_neg).sum(-1)), **TOL)


def test_tiny_features_are_normalised_and_not_degenerate(hps, tiny_clip_dir):
    hf = load_reward_model("clip", tiny_clip_dir)
    x = images(b=3, seed=7)
    x[1] = 0.0
    x[2] = torch.linspace(0, 1, 300).expand(3, 240, 300)
    for model in (hps, hf):
        f = model.encode_image(x)
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(3))
        cos = f @ f.T
        assert cos[0, 1] < 0.99 and cos[0, 2] < 0.99 and cos[1, 2] < 0.99, cos
        t = model.encode_text(["a cat", "a photo of a mountain lake"])
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
        assert (t[0] @ t[1]) < 0.99


def test_gradient_reaches_images_not_reward_weights(hps, hf):
    for model in (hps, hf):
        x = images(b=2, seed=11).requires_grad_(True)
        res = semantic_relative_preference(model, x, CAPTIONS[:2], "Real", "Painting", torch.tensor([0.1, 0.2]))
        res.reward.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
        assert not model.training
        model.train()  # reward models stay in eval mode whatever the caller does
        assert not model.training and not any(m.training for m in model.modules())


def test_text_cache_encodes_each_distinct_text_once(hps, hf):
    towers = [(hps, "encode_text"), (hf, "get_text_features")]
    for model, attr in towers:
        inner = model.model
        original = getattr(inner, attr)
        calls: list[int] = []

        def counting(*args, _orig=original, **kwargs):
            calls.append(1)
            return _orig(*args, **kwargs)

        setattr(inner, attr, counting)
        try:
            first = model.encode_text(["a cat", "a dog", "a cat"])
            assert len(calls) == 1
            again = model.encode_text(["a dog", "a cat"])
            assert len(calls) == 1
            torch.testing.assert_close(again, first[[1, 0]])
            assert not first.requires_grad
            x = images(b=2)
            semantic_relative_preference(model, x, ["a cat", "a dog"], "Real", "Oil", torch.zeros(2))
            assert len(calls) == 3  # one batch of new "Real. ..." texts, one of "Oil. ..." texts
            semantic_relative_preference(model, x, ["a cat", "a dog"], "Real", "Oil", torch.zeros(2))
            assert len(calls) == 3
        finally:
            setattr(inner, attr, original)
        # Cached features equal a fresh computation.
        model.clear_text_cache()
        torch.testing.assert_close(model.encode_text(["a dog", "a cat"]), again)


# ---------------------------------------------------------------------------------------------
# Loaders and their errors
# ---------------------------------------------------------------------------------------------

def _side_effect(path: str) -> None:  # what a malicious pickle would run on load
    Path(path).write_text("executed")


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_side_effect, (self.path,))


def test_hps_loader_refuses_pickled_objects(tiny_hps_files, tmp_path):
    marker = tmp_path / "marker.txt"
    sd = torch.load(tiny_hps_files["checkpoint"], weights_only=True)["state_dict"]
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": sd, "payload": _Evil(str(marker))}, bad)
    with pytest.raises(RewardCheckpointError,
                       match=rf"^cannot load {re.escape(str(bad))} with torch\.load\(weights_only=True\): "):
        HPSv2Reward.load(bad, arch=tiny_hps_files["arch"])
    assert not marker.exists()  # weights_only=True: the payload never ran


def test_hps_loader_errors_name_the_file(tiny_hps_files, tmp_path):
    arch = tiny_hps_files["arch"]
    missing = tmp_path / "nowhere" / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError, match=rf"^HPSv2\.1 checkpoint not found: {re.escape(str(missing))} "
                                                r"\(expected .*HPS_v2\.1_compressed\.pt"):
        HPSv2Reward.load(missing, arch=arch)

    sd = torch.load(tiny_hps_files["checkpoint"], weights_only=True)["state_dict"]
    wrong = dict(sd)
    wrong["visual.not_a_weight"] = wrong.pop("visual.proj")
    wrong_path = tmp_path / "wrong_keys.pt"
    torch.save({"state_dict": wrong}, wrong_path)
    with pytest.raises(RewardCheckpointError, match=rf"^{re.escape(str(wrong_path))} does not match the open_clip "
                                                    r"architecture .*missing keys \['visual\.proj'\]"):
        HPSv2Reward.load(wrong_path, arch=arch)

    no_sd = tmp_path / "no_state_dict.pt"
    torch.save({"epoch": 3}, no_sd)
    with pytest.raises(RewardCheckpointError, match="state_dict"):
        HPSv2Reward.load(no_sd, arch=arch)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(RewardCheckpointError, match=rf"^cannot load {re.escape(str(garbage))} with torch\.load"):
        HPSv2Reward.load(garbage, arch=arch)

    # A bare state dict (no "state_dict" wrapper) is accepted and gives the same model.
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    a = HPSv2Reward.load(bare, arch=arch).encode_text(["a cat"])
    b = HPSv2Reward.load(tiny_hps_files["checkpoint"], arch=arch).encode_text(["a cat"])
    torch.testing.assert_close(a, b)

    with pytest.raises(FileNotFoundError,
                       match=rf"^open_clip model-config JSON not found: {re.escape(str(tmp_path / 'missing.json'))}"):
        HPSv2Reward.load(tiny_hps_files["checkpoint"], arch=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="ViT-H-14"):
        HPSv2Reward.load(tiny_hps_files["checkpoint"], arch="ViT-Q-99")


def test_hf_loader_errors_name_the_path(tiny_clip_dir, tmp_path):
    missing = tmp_path / "no_such_pickscore"
    with pytest.raises(FileNotFoundError, match=rf"^pickscore model folder not found: {re.escape(str(missing))} "):
        HFCLIPReward.load(missing, kind="pickscore")

    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    with pytest.raises(RewardCheckpointError, match=rf"^no weights in {re.escape(str(no_weights))}: expected one of "):
        HFCLIPReward.load(no_weights, kind="clip")

    # from_pretrained would silently random-initialise a missing weight; the loader refuses.
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    sd = load_file(str(tiny_clip_dir / "model.safetensors"))
    del sd["text_projection.weight"]
    save_file(sd, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RewardCheckpointError, match=rf"^{re.escape(str(partial))} does not hold a complete CLIPModel: "
                                                    r".*'missing_keys': .*'text_projection\.weight'"):
        HFCLIPReward.load(partial, kind="pickscore", tokenizer_path=tiny_clip_dir)

    with pytest.raises(FileNotFoundError,
                       match=rf"^pickscore tokenizer folder not found: {re.escape(str(tmp_path / 'no_tok'))} "):
        HFCLIPReward.load(tiny_clip_dir, kind="pickscore", tokenizer_path=tmp_path / "no_tok")

    with pytest.raises(ValueError, match=r"^unknown reward kind 'aesthetic'; valid kinds: hpsv2, pickscore, clip$"):
        load_reward_model("aesthetic", tiny_clip_dir)


def test_hf_loader_takes_a_separate_tokenizer_folder(tiny_clip_dir, tmp_path):
    # PickScore's weights folder and the CLIP-ViT-H-14 processor folder are separate in practice.
    weights = tmp_path / "pickscore_weights"
    weights.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights / name).write_bytes((tiny_clip_dir / name).read_bytes())
    model = load_reward_model("pickscore", weights, tokenizer_path=str(tiny_clip_dir))
    ref = load_reward_model("pickscore", tiny_clip_dir)
    torch.testing.assert_close(model.encode_text(["a cat"]), ref.encode_text(["a cat"]))
    assert model.kind == "pickscore"


# ---------------------------------------------------------------------------------------------
# Tokenizer and tiny-world determinism
# ---------------------------------------------------------------------------------------------


def test_hf_clip_tokenizer_matches_open_clip(tiny_clip_dir):
    from transformers import CLIPTokenizer

    hf_tok = CLIPTokenizer.from_pretrained(tiny_clip_dir, local_files_only=True)
    oc_tok = open_clip.get_tokenizer("ViT-H-14")
    assert len(hf_tok) == 49408
    prompts = [
        "a photo of a cat",
        "natural-lighting. a red car parked on the street at night",
        "concept art. an astronaut riding a horse on mars, 4k, highly detailed",
        "it's a dog's life, isn't it?",
        "two bowls of ramen with chopsticks",
        "oil. portrait of an old fisherman, dramatic lighting",
        "a watercolor painting of a lighthouse (in the style of turner)",
        "flat. 3 apples and 12 oranges on a wooden table",
        "anime. a girl with blue hair; cherry blossoms",
        "real. " + "very " * 100 + "long prompt",  # truncated to 77 tokens by both
    ]
    for p in prompts:
        oc = oc_tok([p])[0]
        hf = hf_tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        hf_ids = hf["input_ids"][0][hf["attention_mask"][0].bool()]
        assert oc[oc != 0].tolist() == hf_ids.tolist(), p
        assert hf_ids[0] == 49406 and hf_ids[-1] == 49407


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_tiny_worlds_are_deterministic_per_seed(tiny_dir, tiny_hps_files, tiny_clip_dir):
    again = make_tiny_hps(tiny_dir / "hps_again", seed=0)
    other = make_tiny_hps(tiny_dir / "hps_seed1", seed=1)
    ref = _digests(Path(tiny_hps_files["checkpoint"]).parent)
    assert set(ref) == {"HPS_v2.1_compressed.pt", "open_clip_config.json"}
    assert _digests(Path(again["checkpoint"]).parent) == ref
    assert _digests(Path(other["checkpoint"]).parent)["HPS_v2.1_compressed.pt"] != ref["HPS_v2.1_compressed.pt"]
    assert json.loads(Path(tiny_hps_files["arch"]).read_text())["text_cfg"]["vocab_size"] == 49408

    ref_clip = _digests(tiny_clip_dir)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(ref_clip)
    assert _digests(make_tiny_hf_clip(tiny_dir / "clip_again", seed=0)) == ref_clip
    assert _digests(make_tiny_hf_clip(tiny_dir / "clip_seed1", seed=1))["model.safetensors"] != ref_clip["model.safetensors"]
    # Building the tiny world leaves the caller's RNG stream alone.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_hps(tiny_dir / "hps_rng", seed=5)
    torch.testing.assert_close(torch.rand(3), expected)
