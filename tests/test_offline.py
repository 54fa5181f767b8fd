"""Offline SRPO on real photographs (scikit-image's sample photos) plus broken files.

The data set: four photographs with captions, and one file for each skip reason (random bytes,
a JPEG cut in half, an image below the resolution, an image without caption file, an empty
caption). The counts are known by construction, independently of the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

PHOTOS = {"astronaut": "an astronaut in a white suit in front of a flag",
          "coffee": "a cup of coffee on a saucer, seen from above",
          "chelsea": "a tabby cat looking to the side",
          "rocket": "a rocket on a launch pad at dusk"}
EXPECTED_SKIPS = {"missing_caption": 1, "empty_caption": 1, "bad_manifest_row": 0, "unreadable": 1,
                  "truncated": 1, "too_small": 1, "too_large": 0, "unsupported_format": 0,
                  "unsupported_mode": 0, "decode_error": 0}


def make_photo_folder(root: Path) -> Path:
    import skimage.data
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(PHOTOS.items()):
        suffix = ".jpg" if i % 2 else ".png"
        Image.fromarray(getattr(skimage.data, name)()).save(root / f"{name}{suffix}", quality=90)
        (root / f"{name}.txt").write_text(caption + "\n")
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(3000))  # not an image
    (root / "noise.txt").write_text("random bytes")
    full = (root / "astronaut.png").read_bytes()
    Image.fromarray(skimage.data.coffee()).save(root / "cut.jpg", quality=90)
    data = (root / "cut.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated mid-scan
    (root / "cut.txt").write_text("half a cup of coffee")
    Image.fromarray(skimage.data.astronaut()[:40, :40]).save(root / "small.png")  # 40 px < 64
    (root / "small.txt").write_text("a small crop")
    (root / "orphan.png").write_bytes(full)  # no caption file
    (root / "blank.png").write_bytes(full)
    (root / "blank.txt").write_text("   \n")
    return root


def test_listing_and_checks_count_every_skip_reason(tmp_path):
    from pipeline.images import ImageScan, check_images, list_images

    root = make_photo_folder(tmp_path / "photos")
    records, skipped = list_images(root)
    usable, more = check_images(records, 64)
    scan = ImageScan(usable, skipped + more)
    assert scan.counts == EXPECTED_SKIPS
    assert sorted(Path(r.path).stem for r in usable) == sorted(PHOTOS)
    assert {Path(r.path).stem: r.caption for r in usable} == PHOTOS


def test_manifests_resolve_relative_paths_and_count_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.images import list_images

    root = make_photo_folder(tmp_path / "photos")
    lines = [json.dumps({"path": f"photos/{n}{'.jpg' if i % 2 else '.png'}", "caption": c})
             for i, (n, c) in enumerate(PHOTOS.items())]
    lines += ["{not json", json.dumps({"path": "photos/small.png", "caption": ""}), json.dumps(["a", "b"])]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    records, skipped = list_images(tmp_path / "m.jsonl")
    assert [Path(r.path).stem for r in records] == list(PHOTOS)
    assert all(Path(r.path).is_absolute() and Path(r.path).is_file() for r in records)
    assert sorted(s.reason for s in skipped) == ["bad_manifest_row", "bad_manifest_row", "empty_caption"]
    pq.write_table(pa.table({"path": [str(root / "coffee.jpg")], "caption": ["coffee"]}), tmp_path / "m.parquet")
    records, skipped = list_images(tmp_path / "m.parquet")
    assert [r.caption for r in records] == ["coffee"] and not skipped
    pq.write_table(pa.table({"file": ["x"], "caption": ["y"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'path'"):
        list_images(tmp_path / "bad.parquet")


def test_decoding_matches_torchvision_resize_and_center_crop(tmp_path):
    """Independent reference: torchvision's PIL Resize(64, bicubic) + CenterCrop(64)."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    from pipeline.images import load_image

    root = make_photo_folder(tmp_path / "photos")
    for name in ("coffee.jpg", "chelsea.png", "astronaut.png"):
        with Image.open(root / name) as im:
            ref = TF.center_crop(TF.resize(im.convert("RGB"), 64, InterpolationMode.BICUBIC), 64)
        expected = np.asarray(ref, dtype=np.float32).transpose(2, 0, 1) / 255.0
        got = load_image(root / name, 64)
        assert got.shape == (3, 64, 64)
        np.testing.assert_array_equal(got, expected)


def test_no_usable_image_fails_at_start_naming_the_field(tmp_path):
    from pipeline.images import scan_images

    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (root / "a.txt").write_text("caption")
    with pytest.raises(ValueError, match=r"data.images: no usable image.*unreadable"):
        scan_images(root, 64)


def test_offline_noise_is_fresh_per_sample_never_shared_across_ranks(tiny_cfg):
    from pipeline.sources import noise_seed

    online = tiny_cfg()  # share_noise_across_ranks: true (the reference, online)
    offline = tiny_cfg("rollout.mode=offline", "data.images=/nonexistent")
    gb, b = 4, 2  # 2 ranks x 2 samples
    # Same position in rank 0's and rank 1's batch of one step:
    assert noise_seed(online, 0, gb, b) == noise_seed(online, 2, gb, b)
    assert noise_seed(offline, 0, gb, b) != noise_seed(offline, 2, gb, b)
    assert len({noise_seed(offline, i, gb, b) for i in range(40)}) == 40  # a new draw every epoch too


def test_offline_run_on_photographs_completes_and_logs_skips(ray_local, tiny_cfg, tiny_world, tmp_path):
    """Also the gold reward wiring on Ray: scored every step, best weights exported, early stop."""
    from mlflow.tracking import MlflowClient

    from pipeline.ray.driver import run_ray

    root = make_photo_folder(tmp_path / "photos")
    gold = json.dumps([{"kind": "pickscore", "path": tiny_world["pickscore"]}])
    cfg = tiny_cfg("rollout.mode=offline", f"data.images={root}", "reward.placement=colocated",
                   "train.max_steps=3", "log.image_every=0", f"eval.gold={gold}", "eval.every=1",
                   "eval.patience=1", "eval.num_prompts=3")
    result = run_ray(cfg)
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for reason, n in EXPECTED_SKIPS.items():
        assert m[f"data/skipped/{reason}"] == n, reason
    assert m["data/skipped_total"] == sum(EXPECTED_SKIPS.values())
    assert m["data/images_usable"] == len(PHOTOS)
    steps = [h.step for h in client.get_metric_history(result["run_id"], "loss")]
    gold_scores = [h.value for h in sorted(client.get_metric_history(result["run_id"], "gold/score"),
                                           key=lambda h: h.step)]
    assert len(gold_scores) == len(steps)  # scored after every step
    best = json.loads((Path(cfg.output.dir) / "best" / "best.json").read_text())
    # best.json holds the first maximum of the logged history (step = optimizer steps done).
    assert best["step"] == gold_scores.index(max(gold_scores)) + 1
    assert best["gold_score"] == max(gold_scores)
    stopped = run.data.tags.get("srpo.early_stopped_at_step")
    if stopped is None:  # patience 1: the run stops at the first evaluation without a new best
        assert steps == [0, 1, 2] and gold_scores == sorted(gold_scores)
    else:
        assert steps == list(range(int(stopped)))
        assert gold_scores[-1] <= max(gold_scores[:-1])
    listed = json.loads(Path(client.download_artifacts(result["run_id"], "data/skipped_images.json", str(tmp_path)))
                        .read_text())
    assert sorted(Path(s["path"]).name for s in listed["skipped"]) == sorted(
        ["noise.jpg", "cut.jpg", "small.png", "orphan.png", "blank.png"])
    assert torch.isfinite(torch.tensor(m["loss"]))
    assert Path(result["export"]).is_file()
