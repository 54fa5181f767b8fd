"""Real images with captions for offline SRPO (rollout.mode=offline; SRPO_SPEC section 1).

Sources (``data.images``):
- a folder: every image file (``.jpg .jpeg .png .webp .bmp .tif .tiff``, searched recursively, in
  sorted path order) with its caption in the same-named ``.txt`` file next to it;
- a manifest: ``.parquet`` with columns ``path`` and ``caption``, or ``.jsonl`` with one
  ``{"path": ..., "caption": ...}`` object a line. Relative paths are relative to the manifest.

Nothing is lost silently: every file that cannot be used is recorded with a reason, counted,
and the counts and the list are logged to MLflow by the driver:

    missing_caption   no .txt next to the image (folder source)
    empty_caption     the caption is empty or blank
    bad_manifest_row  a manifest row without a usable path / caption, or not valid JSON
    unreadable        not a JPEG / PNG / WebP / BMP / TIFF image PIL can identify, or missing
    truncated         the file ends before the image data does
    too_small         shorter side below data.min_image_size (default: data.resolution)
    too_large         more pixels than data.max_image_pixels (PIL's decompression-bomb guard,
                      checked on the header: such a file is never decoded)
    unsupported_format  a file in a folder source whose suffix is not an image suffix above
                      (e.g. .heic, .gif); hidden files and the .txt captions are not counted
    unsupported_mode  a pixel mode without a faithful RGB conversion (LAB)
    decode_error      any other exception of the decoder on this one file (named in the detail)

Images are decoded with PIL, turned upright (EXIF orientation), converted to RGB faithfully for
every mode (:func:`to_rgb`; docs/data.md), resized so the shorter side equals the training
resolution (bicubic, antialiased) and center-cropped to a square: the model's VAE then encodes them.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import ConfigError, DataConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SKIP_REASONS = ("missing_caption", "empty_caption", "bad_manifest_row", "unreadable", "truncated", "too_small",
                "too_large", "unsupported_format", "unsupported_mode", "decode_error")


@dataclass(frozen=True)
class ImageRecord:
    path: str
    caption: str


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # one of SKIP_REASONS
    detail: str = ""


class ImageSkip(Exception):
    """An image that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ------------------------------------------------------------------------------------------ listing


def list_images(source: str | Path) -> tuple[list[ImageRecord], list[Skipped]]:
    """The (path, caption) records of a folder or manifest, and the entries skipped while listing."""
    src = Path(source)
    if src.is_dir():
        return _list_folder(src)
    if src.is_file() and src.suffix == ".parquet":
        return _list_parquet(src)
    if src.is_file() and src.suffix == ".jsonl":
        return _list_jsonl(src)
    raise FileNotFoundError(f"data.images: {str(src)!r} is neither a folder nor a .parquet / .jsonl manifest")


def _list_folder(root: Path) -> tuple[list[ImageRecord], list[Skipped]]:
    records, skipped = [], []
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        if f.suffix.lower() not in IMAGE_SUFFIXES + (".txt",):
            skipped.append(Skipped(str(f), "unsupported_format",
                                   f"suffix {f.suffix or '(none)'!r} is not one of {' '.join(IMAGE_SUFFIXES)}"))
    for f in (p for p in files if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = f.with_suffix(".txt")
        if not txt.is_file():
            skipped.append(Skipped(str(f), "missing_caption", f"no {txt.name} next to it"))
            continue
        caption = txt.read_text(encoding="utf-8", errors="replace").strip()
        if not caption:
            skipped.append(Skipped(str(f), "empty_caption", f"{txt.name} is empty"))
            continue
        records.append(ImageRecord(str(f.resolve()), caption))
    return records, skipped


def _record(base: Path, path, caption, where: str) -> ImageRecord | Skipped:
    if not isinstance(path, str) or not path.strip():
        return Skipped(where, "bad_manifest_row", f"path {path!r} is not a non-empty string")
    full = str((base / path).resolve()) if not Path(path).is_absolute() else path
    if not isinstance(caption, str) or not caption.strip():
        return Skipped(full, "empty_caption", f"{where}: caption {caption!r}")
    return ImageRecord(full, caption.strip())


def _split(items: list[ImageRecord | Skipped]) -> tuple[list[ImageRecord], list[Skipped]]:
    return ([i for i in items if isinstance(i, ImageRecord)], [i for i in items if isinstance(i, Skipped)])


def _list_parquet(manifest: Path) -> tuple[list[ImageRecord], list[Skipped]]:
    import pyarrow.parquet as pq

    table = pq.read_table(manifest)
    missing = [c for c in ("path", "caption") if c not in table.column_names]
    if missing:
        raise ValueError(f"data.images: {manifest} has columns {table.column_names}; "
                         f"expected 'path' and 'caption' (missing {missing})")
    paths, captions = table.column("path").to_pylist(), table.column("caption").to_pylist()
    return _split([_record(manifest.parent, p, c, f"{manifest}:row {i}")
                   for i, (p, c) in enumerate(zip(paths, captions))])


def _list_jsonl(manifest: Path) -> tuple[list[ImageRecord], list[Skipped]]:
    items: list[ImageRecord | Skipped] = []
    for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{manifest}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            items.append(Skipped(where, "bad_manifest_row", f"not JSON ({e})"))
            continue
        if not isinstance(row, dict):
            items.append(Skipped(where, "bad_manifest_row", "expected an object with path and caption"))
            continue
        items.append(_record(manifest.parent, row.get("path"), row.get("caption"), where))
    return _split(items)


# ------------------------------------------------------------------------------------------ decoding

# PIL's plugins for the formats of IMAGE_SUFFIXES only (JPEG includes camera MPO files): a file in any
# other format is "unreadable" and never reaches a plugin that shells out (EPS) or is rarely exercised.
DECODE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
DEFAULT_MAX_IMAGE_PIXELS = DataConfig.max_image_pixels  # PIL's own default Image.MAX_IMAGE_PIXELS
_AS_IS = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")  # PIL's convert("RGB") is exact for these
_ALPHA = ("LA", "PA", "RGBA")
_HIGH_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(im) -> "Image.Image":
    """Any mode PIL opens from the formats above -> 8-bit RGB, faithfully (docs/data.md):

    - 1, L, P, RGBX, CMYK (C, M, Y, K ink -> 255 (1-C)(1-K) ...), YCbCr (JFIF matrix): PIL's convert;
    - alpha (LA, PA, RGBA, or a transparency key in P, L, RGB) composited on white: transparent
      regions become the white background they show on a page, not the colour hidden under alpha 0;
    - I;16*, I, F: scaled by their real range, never clipped (:func:`high_bit_to_uint8`).
    Raises :class:`ImageSkip` ("unsupported_mode") for the rest (LAB, which PIL cannot convert).
    """
    from PIL import Image

    mode = im.mode
    if mode in _HIGH_BIT:
        return Image.fromarray(high_bit_to_uint8(im)).convert("RGB")  # 2-D uint8: mode L
    if mode in _ALPHA or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if mode in _AS_IS:
        return im if mode == "RGB" else im.convert("RGB")
    raise ImageSkip("unsupported_mode", f"mode {mode} has no faithful RGB conversion here")


def high_bit_to_uint8(im) -> np.ndarray:
    """One-channel high-bit-depth samples -> uint8, linear, from black ``lo`` to white ``hi``:

    - I;16 (16-bit PNG / TIFF): lo 0, hi 65535, the type's full range, as 8-bit images use 0..255:
      a dark photo stays dark (PIL's own convert clips at 255, which made such images white).
      A TIFF that declares fewer bits (12-bit scanners) uses 2**bits - 1.
    - I (32-bit integer): no standard white level: lo min(0, image min), hi the image's maximum.
    - F (32-bit float): values in [0, 1] as they are (the float convention); a wider range is scaled
      down to fit, lo min(0, min), hi max(1, max).
    In every case hi is at least the image's maximum and lo at most its minimum: nothing is clipped.
    """
    a = np.asarray(im).astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageSkip("decode_error", f"mode {im.mode} with non-finite sample values")
    lo, top = min(0.0, float(a.min())), float(a.max())
    if im.mode.startswith("I;16"):
        hi = max(float(2 ** _declared_bits(im) - 1), top)
    elif im.mode == "F":
        hi = max(1.0, top)
    else:
        hi = top
    if hi <= lo:  # a constant image of zeros (or of negatives): black
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) / (hi - lo) * 255.0).astype(np.uint8)


def _declared_bits(im) -> int:
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return int(bits) if isinstance(bits, int) and 1 <= bits < 16 else 16


@contextmanager
def _pixel_limit(max_pixels: int):
    """PIL's decompression-bomb guard at ``max_pixels``: Image.open raises from the header, before
    any pixel is decoded (PIL only warns between 1x and 2x its limit, so the warning is an error here).
    Process-wide PIL state, restored after; image decoding runs one file at a time per process."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_rgb(path: str | Path, min_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """The upright 8-bit RGB image of a file. Raises :class:`ImageSkip` for every failure: any
    exception of PIL's decoders becomes a reason (SKIP_REASONS), never a crash of the scan."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with _pixel_limit(max_pixels), Image.open(path, formats=DECODE_FORMATS) as im:
            w, h = im.size  # from the header: nothing is decoded yet
            if min(w, h) < min_size:
                raise ImageSkip("too_small", f"{w}x{h}, shorter side below {min_size}")
            im.load()  # full decode: a truncated file fails here, not later in a worker
            # Camera orientation before any resize or crop: EXIF 6 is a portrait shot stored sideways.
            # In place: the file's tags (a TIFF's declared bit depth) stay with the image for to_rgb.
            ImageOps.exif_transpose(im, in_place=True)
            return to_rgb(im)
    except ImageSkip as e:
        raise ImageSkip(e.reason, f"{path}: {e.detail}") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageSkip("too_large", f"{path}: {e} (data.max_image_pixels={max_pixels})") from e
    except FileNotFoundError as e:
        raise ImageSkip("unreadable", f"{path}: file not found") from e
    except UnidentifiedImageError as e:
        raise ImageSkip("unreadable", f"{path}: not a JPEG, PNG, WebP, BMP or TIFF image") from e
    except EOFError as e:  # a decoder ran out of data
        raise ImageSkip("truncated", f"{path}: {e or 'unexpected end of file'}") from e
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).lower()
        reason = "truncated" if "truncat" in msg or "broken data stream" in msg else "unreadable"
        raise ImageSkip(reason, f"{path}: {e}") from e
    except Exception as e:  # noqa: BLE001  any other decoder bug on one file (struct.error, MemoryError...)
        raise ImageSkip("decode_error", f"{path}: {type(e).__name__}: {e}") from e


def load_image(path: str | Path, resolution: int, min_size: int = 0,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode, check, resize (shorter side = resolution) and center-crop: float32 [3, R, R] in [0, 1].

    Raises :class:`ImageSkip` for the reasons of SKIP_REASONS instead of any decoder error.
    """
    from PIL import Image

    rgb = decode_rgb(path, min_size or resolution, max_pixels)
    w, h = rgb.size
    # torchvision's Resize(int) / CenterCrop arithmetic: long side int(R * long / short), offsets rounded.
    if w <= h:
        nw, nh = resolution, int(resolution * h / w)
    else:
        nw, nh = int(resolution * w / h), resolution
    rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - resolution) / 2.0)), int(round((nh - resolution) / 2.0))
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    # C-contiguous [3, R, R]: a transposed (channels-last) batch made the VAE's convolutions give
    # identical images' latents ~1e-3 apart depending on their place in the batch (measured on CPU).
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)) / np.float32(255.0)


def check_images(records: list[ImageRecord], resolution: int, min_size: int = 0,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[ImageRecord], list[Skipped]]:
    """Decode every record once; the usable ones in order, and the rest with their reasons."""
    usable, skipped = [], []
    for r in records:
        try:
            load_image(r.path, resolution, min_size, max_pixels)
        except ImageSkip as e:
            skipped.append(Skipped(r.path, e.reason, e.detail))
        else:
            usable.append(r)
    return usable, skipped


@dataclass
class ImageScan:
    """What the pre-flight scan found: the usable records (training order) and every skip."""

    usable: list[ImageRecord]
    skipped: list[Skipped]

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(s.reason for s in self.skipped)
        return {reason: c.get(reason, 0) for reason in SKIP_REASONS}

    def metrics(self) -> dict[str, float]:
        out = {f"data/skipped/{k}": float(v) for k, v in self.counts.items()}
        out["data/skipped_total"] = float(len(self.skipped))
        out["data/images_usable"] = float(len(self.usable))
        return out

    def report(self) -> dict:
        return {"usable": len(self.usable), "counts": self.counts, "skipped": [asdict(s) for s in self.skipped]}


def scan_images(source: str | Path, resolution: int, min_size: int = 0,
                check: Callable[..., tuple[list[ImageRecord], list[Skipped]]] = check_images,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageScan:
    """List and decode-check every image, before training starts.

    ``check(records, resolution, min_size, max_pixels)`` decodes the listed records (default:
    :func:`check_images`, in this process;
    ``pipeline.ray.images.scan_images`` passes a Ray Data map). Raises ConfigError (a ValueError)
    naming ``data.images`` when no image is usable: that is a configuration error, found before any
    learner or actor starts.
    """
    records, skipped = list_images(source)
    usable, more = check(records, resolution, min_size, max_pixels) if records else ([], [])
    scan = ImageScan(usable, skipped + more)
    if not usable:
        raise ConfigError(f"data.images: no usable image in {source} ({len(scan.skipped)} skipped: "
                          f"{ {k: v for k, v in scan.counts.items() if v} }); expected images of at least "
                          f"{min_size or resolution} px on the shorter side and at most {max_pixels} pixels "
                          "(data.max_image_pixels) with non-empty captions")
    return scan
