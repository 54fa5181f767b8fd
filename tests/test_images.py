"""Real-world image files: every mode PIL opens decoded faithfully, or the file counted as skipped.

Expected pixels are computed here with numpy from the samples the test wrote (the formulas of
docs/data.md), never by the code under test. Images are R x R, so load_image's resize and crop are
the identity and its output is the RGB conversion itself.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

R = 32  # test resolution: images of R x R pixels pass through resize/crop unchanged
RNG = np.random.default_rng(0)


def _load(path: Path, **kw) -> np.ndarray:
    """load_image's [3, R, R] floats back to uint8-scale [R, R, 3] numbers."""
    from pipeline.images import load_image

    return load_image(path, R, **kw).transpose(1, 2, 0) * 255.0


def _gray3(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v, dtype=np.float64)[..., None], 3, axis=-1)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha compositing over an opaque white background (straight alpha), in 0..255."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def _write_tiff12(path: Path, a: np.ndarray) -> None:
    """A 12-bit grayscale TIFF (packed MSB first, as scanners write them): PIL cannot write one."""
    h, w = a.shape
    data = bytearray()
    for row in a:
        bits = "".join(format(int(v), "012b") for v in row)
        bits += "0" * (-len(bits) % 8)
        data += int(bits, 2).to_bytes(len(bits) // 8, "big")
    entries = [(256, 3, w), (257, 3, h), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 3, h), (279, 4, len(data))]
    out = b"II*\x00" + struct.pack("<I", 8 + len(data)) + bytes(data) + struct.pack("<H", len(entries))
    for tag, typ, val in entries:
        out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
    path.write_bytes(out + struct.pack("<I", 0))


# ------------------------------------------------------------------------------------------ modes


def test_bilevel_gray_and_gray_alpha(tmp_path):
    from PIL import Image

    bits = RNG.random((R, R)) > 0.5
    Image.fromarray(bits).save(tmp_path / "one.png")
    g = RNG.integers(0, 256, (R, R), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "l.png")
    a = RNG.integers(0, 256, (R, R), dtype=np.uint8)
    Image.fromarray(np.stack([g, a], -1), "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "one.png").mode == "1" and Image.open(tmp_path / "la.png").mode == "LA"

    np.testing.assert_array_equal(_load(tmp_path / "one.png"), _gray3(bits * 255.0))
    np.testing.assert_array_equal(_load(tmp_path / "l.png"), _gray3(g))
    np.testing.assert_allclose(_load(tmp_path / "la.png"), _gray3(_on_white(g[..., None], a)[..., 0]), atol=1)


def test_gray_with_transparency_key_is_white_where_transparent(tmp_path):
    from PIL import Image

    g = RNG.integers(0, 256, (R, R), dtype=np.uint8)
    g[:8] = 7  # the transparent grey level
    Image.fromarray(g).save(tmp_path / "trns.png", transparency=7)
    expected = _gray3(np.where(g == 7, 255, g))
    np.testing.assert_array_equal(_load(tmp_path / "trns.png"), expected)


def test_rgba_is_composited_on_white(tmp_path):
    from PIL import Image

    rgba = RNG.integers(0, 256, (R, R, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # fully transparent row: white, not the colour hidden under it
    rgba[1, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = _load(tmp_path / "rgba.png")
    np.testing.assert_allclose(got, _on_white(rgba[..., :3], rgba[..., 3]), atol=1)
    np.testing.assert_array_equal(got[0], np.full((R, 3), 255.0))
    np.testing.assert_array_equal(got[1], rgba[1, :, :3])


def test_palette_with_transparency(tmp_path):
    from PIL import Image

    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 256, (R, R), dtype=np.uint8)
    # One fully transparent entry (the GIF-style key) ...
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.tobytes())
    im.save(tmp_path / "key.png", transparency=5)
    expected = np.where((idx == 5)[..., None], 255.0, palette[idx].astype(np.float64))
    np.testing.assert_array_equal(_load(tmp_path / "key.png"), expected)
    # ... and per-entry alpha (PNG tRNS with partial transparency).
    alphas = RNG.integers(0, 256, 256, dtype=np.uint8)
    im.save(tmp_path / "alpha.png", transparency=alphas.tobytes())
    assert Image.open(tmp_path / "alpha.png").mode == "P"
    np.testing.assert_allclose(_load(tmp_path / "alpha.png"), _on_white(palette[idx], alphas[idx]), atol=1)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16", ".tif"), ("I;16B", ".tif")])
def test_16_bit_gray_scaled_by_its_full_range_not_clipped(tmp_path, mode, suffix):
    from PIL import Image

    v = RNG.integers(0, 65536, (R, R)).astype(np.uint16)
    v[0, 0], v[0, 1] = 0, 65535
    v[1] = 3000  # a dark row: 3000/65535 of white, ~12 of 255, not 255 (PIL's convert clips: white)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    Image.frombytes(mode, (R, R), v.astype(dtype).tobytes()).save(tmp_path / f"g{suffix}")
    assert Image.open(tmp_path / f"g{suffix}").mode == mode
    got = _load(tmp_path / f"g{suffix}")
    np.testing.assert_array_equal(got, _gray3(np.rint(v / 65535.0 * 255.0)))
    assert got[1, 0, 0] == 12


def test_48_bit_rgb_and_64_bit_rgba_png(tmp_path):
    """16 bits per channel colour PNGs (PIL cannot write them): within 1 of v / 65535 * 255."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    for name, channels, color_type in (("rgb48.png", 3, 2), ("rgba64.png", 4, 6)):
        v = RNG.integers(0, 65536, (R, R, channels))
        v[..., -1] = 65535 if channels == 4 else v[..., -1]  # opaque: the colour itself is checked
        raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in v)
        ihdr = struct.pack(">IIBBBBB", R, R, 16, color_type, 0, 0, 0)
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                                      + chunk(b"IEND", b""))
        np.testing.assert_allclose(_load(tmp_path / name), v[..., :3] / 65535.0 * 255.0, atol=1)


def test_12_bit_tiff_scaled_by_its_declared_depth(tmp_path):
    from PIL import Image

    v = RNG.integers(0, 4096, (R, R))
    _write_tiff12(tmp_path / "scan.tif", v)
    assert Image.open(tmp_path / "scan.tif").mode == "I;16"
    np.testing.assert_array_equal(_load(tmp_path / "scan.tif"), _gray3(np.rint(v / 4095.0 * 255.0)))


def test_32_bit_integer_and_float_scaled_by_their_real_range(tmp_path):
    from PIL import Image

    i = RNG.integers(-70_000, 300_000, (R, R)).astype(np.int32)
    Image.fromarray(i, "I").save(tmp_path / "i.tif")
    lo, hi = float(i.min()), float(i.max())
    np.testing.assert_array_equal(_load(tmp_path / "i.tif"), _gray3(np.rint((i - lo) / (hi - lo) * 255.0)))

    unit = RNG.random((R, R)).astype(np.float32) * 0.8  # within [0, 1]: used as it is, not stretched
    Image.fromarray(unit, "F").save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(_load(tmp_path / "unit.tif"), _gray3(np.rint(unit.astype(np.float64) * 255.0)))

    wide = (RNG.random((R, R)) * 3.5 - 0.5).astype(np.float32)  # beyond [0, 1]: scaled to fit, not clipped
    Image.fromarray(wide, "F").save(tmp_path / "wide.tif")
    w = wide.astype(np.float64)
    lo, hi = min(0.0, w.min()), max(1.0, w.max())
    np.testing.assert_array_equal(_load(tmp_path / "wide.tif"), _gray3(np.rint((w - lo) / (hi - lo) * 255.0)))


def test_cmyk_and_ycbcr(tmp_path):
    from PIL import Image

    cmyk = RNG.integers(0, 256, (R, R, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    ink = cmyk.astype(np.float64) / 255.0
    expected = 255.0 * (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:])
    np.testing.assert_allclose(_load(tmp_path / "c.tif"), expected, atol=0.5 + 1e-9)

    ycc = RNG.integers(0, 256, (R, R, 3), dtype=np.uint8)
    Image.fromarray(ycc, "YCbCr").save(tmp_path / "y.tif")
    assert Image.open(tmp_path / "y.tif").mode == "YCbCr"
    y, cb, cr = (ycc[..., k].astype(np.float64) for k in range(3))
    jfif = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                     y + 1.772 * (cb - 128)], -1).clip(0, 255)
    np.testing.assert_allclose(_load(tmp_path / "y.tif"), jfif, atol=1)  # PIL: fixed-point JFIF


def test_cmyk_jpeg_as_photoshop_writes_them(tmp_path):
    """The decoded CMYK samples (Adobe's inverted storage is the decoder's business) -> RGB."""
    from PIL import Image

    cmyk = np.zeros((R, R, 4), dtype=np.uint8)
    cmyk[:16, :, 0] = 200  # cyan top half, black ink bottom right
    cmyk[16:, 16:, 3] = 128
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.mode == "CMYK"
        ink = np.asarray(im).astype(np.float64) / 255.0
    np.testing.assert_allclose(_load(tmp_path / "c.jpg"), 255.0 * (1 - ink[..., :3]) * (1 - ink[..., 3:]), atol=0.5 + 1e-9)


@pytest.mark.parametrize("orientation, k", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied_before_resizing(tmp_path, orientation, k):
    """EXIF 6: stored rotated 90 degrees counter-clockwise, shown rotated clockwise (np.rot90 k=-1)."""
    from PIL import Image

    stored = np.zeros((R, R, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)  # red block in the stored top-left corner
    stored[-8:, :] = (0, 0, 255)  # blue band along the stored bottom
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "cam.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "cam.jpg") as im:
        raw = np.asarray(im).astype(np.float64)  # the pixels as stored, before orientation
    np.testing.assert_array_equal(_load(tmp_path / "cam.jpg"), np.rot90(raw, k=k))


def test_portrait_photo_stored_sideways_is_cropped_upright(tmp_path):
    """A 2R x R (w x h) buffer with EXIF 6 is an R x 2R portrait: the square crop is its middle rows.
    Cropped sideways (no orientation), the crop would be the buffer's middle columns instead."""
    from PIL import Image

    stored = np.full((R, 2 * R, 3), 255, dtype=np.uint8)
    stored[: R // 2] = 0  # stored top half black: the right half of the upright photo
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "portrait.jpg") as im:
        raw = np.asarray(im).astype(np.float64)
    got = _load(tmp_path / "portrait.jpg")
    np.testing.assert_array_equal(got, np.rot90(raw, k=-1)[R // 2: R // 2 + R])
    assert got[:, : R // 2].min() > 240 and got[:, R // 2:].max() < 15  # white left, black right


# ------------------------------------------------------------------------------------------ skips


def _reason(path: Path, **kw) -> str:
    from pipeline.images import ImageSkip, load_image

    with pytest.raises(ImageSkip) as e:
        load_image(path, R, **kw)
    assert str(path) in e.value.detail
    return e.value.reason


def test_over_the_pixel_limit_is_skipped_before_decoding(tmp_path):
    from PIL import Image

    limit = 40 * 40
    for side in (41, 60, 100):  # just over (PIL only warns up to 2x its limit), and far over (PIL raises)
        Image.new("RGB", (side, side), (9, 9, 9)).save(tmp_path / f"{side}.png")
        assert _reason(tmp_path / f"{side}.png", max_pixels=limit) == "too_large"
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    assert _load(tmp_path / "ok.png", max_pixels=limit).shape == (R, R, 3)
    # The header alone decides: a cut file over the limit is too_large, not truncated.
    data = (tmp_path / "100.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:60])
    assert _reason(tmp_path / "cut.png", max_pixels=limit) == "too_large"
    assert _reason(tmp_path / "cut.png") == "truncated"
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's process-wide limit is restored


def test_corrupt_truncated_and_non_image_files_are_skips(tmp_path):
    from PIL import Image

    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.png").write_bytes(RNG.bytes(2000))
    (tmp_path / "letter.jpg").write_text("Dear reader, this is not a photograph.\n")
    Image.new("RGB", (R, R)).save(tmp_path / "anim.gif")  # a real image in a format not supported
    Image.new("LAB", (R, R), (50, 10, 10)).save(tmp_path / "lab.tif")
    f = RNG.random((R, R)).astype(np.float32)
    f[3, 3] = np.nan
    Image.fromarray(f, "F").save(tmp_path / "nan.tif")
    assert _reason(tmp_path / "half.jpg") == "truncated"
    assert _reason(tmp_path / "noise.png") == "unreadable"
    assert _reason(tmp_path / "letter.jpg") == "unreadable"
    assert _reason(tmp_path / "anim.gif") == "unreadable"
    assert _reason(tmp_path / "missing.png") == "unreadable"
    assert _reason(tmp_path / "lab.tif") == "unsupported_mode"
    assert _reason(tmp_path / "nan.tif") == "decode_error"


@pytest.mark.parametrize("error", [IndexError("tile index"), RuntimeError("decoder bug"), MemoryError()])
def test_any_other_decoder_exception_is_a_counted_skip(tmp_path, monkeypatch, error):
    from PIL import Image, ImageFile

    from pipeline.images import ImageRecord, check_images

    Image.new("RGB", (R, R)).save(tmp_path / "a.png")
    Image.new("RGB", (R, R)).save(tmp_path / "b.bmp")
    original = ImageFile.ImageFile.load

    def load(self):  # the PNG decoder fails with an exception nobody anticipated
        if self.format == "PNG":
            raise error
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    usable, skipped = check_images([ImageRecord(str(tmp_path / "a.png"), "a"),
                                    ImageRecord(str(tmp_path / "b.bmp"), "b")], R)
    assert [Path(r.path).name for r in usable] == ["b.bmp"]
    assert [(Path(s.path).name, s.reason) for s in skipped] == [("a.png", "decode_error")]
    assert type(error).__name__ in skipped[0].detail


def test_pixel_limit_is_a_validated_config_key(tiny_cfg):
    from pipeline.config import ConfigError

    assert tiny_cfg().data.max_image_pixels == 89_478_485  # PIL's own default
    assert tiny_cfg("data.max_image_pixels=4096").data.max_image_pixels == 64 * 64
    with pytest.raises(ConfigError, match=r"data.max_image_pixels: got 4095, expected >= 4096"):
        tiny_cfg("data.max_image_pixels=4095")  # below resolution 64 squared: every image would be skipped


# ------------------------------------------------------------------------------------------ a real folder

LIMIT = 100 * 100  # data.max_image_pixels of the folder test (resolution 64: 4096 <= LIMIT)
EXPECTED = {"missing_caption": 1, "empty_caption": 0, "bad_manifest_row": 0, "unreadable": 2, "truncated": 1,
            "too_small": 1, "too_large": 1, "unsupported_format": 2, "unsupported_mode": 0, "decode_error": 0}
USABLE = ["cmyk.jpg", "gray.jpg", "high_bit.png", "one_bit.png", "palette.png", "rgba.png",
          "rotated.jpg", "scan.tif"]


def make_mixed_folder(root: Path) -> Path:
    """The files people have: a 16-bit PNG, a CMYK JPEG, a transparent palette PNG, a sideways camera
    JPEG, an RGBA logo, grayscale and bilevel scans, a 12-bit TIFF; and what goes wrong."""
    from PIL import Image

    root.mkdir(parents=True)
    ramp = np.linspace(0, 1, 96)[None, :] * np.linspace(0.2, 1, 80)[:, None]  # 96 x 80, w x h
    Image.fromarray((ramp * 4000).astype(np.uint16)).save(root / "high_bit.png")  # dark: max ~6% of white
    cmyk = np.zeros((80, 80, 4), np.uint8)
    cmyk[..., 1] = 180
    Image.fromarray(cmyk, "CMYK").save(root / "cmyk.jpg", quality=90)
    pal = Image.fromarray((ramp * 255).astype(np.uint8)).convert("P")
    pal.save(root / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray((ramp[..., None] * [255, 128, 0]).astype(np.uint8)).save(root / "rotated.jpg", exif=exif)
    rgba = np.zeros((70, 70, 4), np.uint8)
    rgba[20:50, 20:50] = (200, 30, 30, 255)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray((ramp * 255).astype(np.uint8)).save(root / "gray.jpg")
    Image.fromarray(ramp > 0.5).save(root / "one_bit.png")
    _write_tiff12(root / "scan.tif", (ramp * 4095).astype(np.int64))
    Image.new("RGB", (120, 120), (1, 2, 3)).save(root / "huge.png")  # 14400 px > LIMIT: too_large
    Image.new("RGB", (40, 40)).save(root / "tiny.png")  # too_small
    data = (root / "gray.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (root / "noise.png").write_bytes(RNG.bytes(3000))  # unreadable
    (root / "letter.jpg").write_text("a text file with a photo's name\n")  # unreadable
    (root / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")  # unsupported_format
    (root / "notes.md").write_text("where these photos come from\n")  # unsupported_format
    (root / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: not counted
    for p in list(root.iterdir()):
        if p.suffix not in (".md", "") and p.name != "orphan.png":
            p.with_suffix(".txt").write_text(f"a picture called {p.stem}\n")
    Image.new("RGB", (80, 80)).save(root / "orphan.png")  # missing_caption
    return root


def test_mixed_folder_scan_counts_are_exact(tmp_path):
    from pipeline.images import load_image, scan_images

    root = make_mixed_folder(tmp_path / "photos")
    scan = scan_images(root, 64, max_pixels=LIMIT)
    assert scan.counts == EXPECTED, {s.path: s.reason for s in scan.skipped}
    assert sorted(Path(r.path).name for r in scan.usable) == USABLE
    assert all((root / n).is_file() for n in USABLE)
    # data.min_image_size: 75 also refuses the 70 x 70 logo; 32 admits the 40 x 40 image, upsampled to 64.
    larger = scan_images(root, 64, 75, max_pixels=LIMIT)
    assert larger.counts == {**EXPECTED, "too_small": 2}
    assert sorted(Path(r.path).name for r in larger.usable) == [n for n in USABLE if n != "rgba.png"]
    smaller = scan_images(root, 64, 32, max_pixels=LIMIT)
    assert smaller.counts == {**EXPECTED, "too_small": 0}
    assert sorted(Path(r.path).name for r in smaller.usable) == sorted([*USABLE, "tiny.png"])
    assert load_image(root / "tiny.png", 64, 32).shape == (3, 64, 64)


def test_mixed_folder_high_bit_image_is_not_white(tmp_path):
    """The observed failure: a 16-bit PNG trained on as a white square."""
    root = make_mixed_folder(tmp_path / "photos")
    from pipeline.images import load_image

    px = load_image(root / "high_bit.png", 64)
    assert px.max() < 0.1  # 4000 / 65535 = 0.061 of white at most


def test_mixed_folder_trains_and_logs_exact_skip_counts(tiny_cfg, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipeline.runs import run_local

    root = make_mixed_folder(tmp_path / "photos")
    cfg = tiny_cfg("rollout.mode=offline", f"data.images={root}", f"data.max_image_pixels={LIMIT}",
                   "learner.num_workers=0", "train.max_steps=2", "train.batch_size=2", "log.image_every=0",
                   "rollout.placement=colocated", "reward.placement=colocated")
    result = run_local(cfg)
    client = MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert {k: m[f"data/skipped/{k}"] for k in EXPECTED} == EXPECTED
    assert m["data/skipped_total"] == sum(EXPECTED.values())
    assert m["data/images_usable"] == len(USABLE)
    assert sorted(h.step for h in client.get_metric_history(result["run_id"], "loss")) == [0, 1]
    listed = json.loads(Path(client.download_artifacts(result["run_id"], "data/skipped_images.json",
                                                       str(tmp_path))).read_text())
    assert sorted((Path(s["path"]).name, s["reason"]) for s in listed["skipped"]) == sorted([
        ("orphan.png", "missing_caption"), ("noise.png", "unreadable"), ("letter.jpg", "unreadable"),
        ("cut.jpg", "truncated"), ("tiny.png", "too_small"), ("huge.png", "too_large"),
        ("photo.heic", "unsupported_format"), ("notes.md", "unsupported_format")])


# ------------------------------------------------------------------------------------------ encode stage


def test_encode_stage_replaces_a_file_broken_since_the_scan(tiny_cfg, tmp_path):
    """A usable file removed after the scan: its row gets the next decodable row's image and caption
    (they still match), the row is flagged, and the stage does not raise."""
    from PIL import Image

    from pipeline.sources import ImageEncodeStage

    paths = []
    for i in range(3):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    cfg = tiny_cfg("rollout.mode=offline", f"data.images={tmp_path}")
    stage = ImageEncodeStage(cfg.to_dict())

    def batch(ps):
        return {"path": np.asarray(ps), "caption": np.asarray([f"cap {Path(p).stem}" for p in ps]),
                "noise_seed": np.arange(len(ps), dtype=np.int64)}

    good = stage(batch(paths))
    Path(paths[1]).unlink()
    out = stage(batch(paths))
    assert out["image_skipped"].tolist() == [0, 1, 0]
    assert [str(c) for c in out["caption"]] == ["cap 0", "cap 2", "cap 2"]
    # Row 1 holds file 2's latent (the same pixels in the same batch), far from file 1's.
    np.testing.assert_allclose(out["x0"][1], out["x0"][2], atol=1e-6)
    assert np.abs(good["x0"][1] - good["x0"][2]).max() > 0.05
    assert np.abs(out["x0"][1] - good["x0"][1]).max() > 0.05
    # A batch of only broken files takes the last good row this stage saw.
    alone = stage(batch([paths[1]]))
    assert alone["image_skipped"].tolist() == [1] and [str(c) for c in alone["caption"]] == ["cap 2"]
    fresh = ImageEncodeStage(cfg.to_dict())
    with pytest.raises(RuntimeError, match=r"data.images: no image of this batch decodes.*unreadable"):
        fresh(batch([paths[1]]))
