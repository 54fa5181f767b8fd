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
    unreadable        not an image PIL can identify, or missing
    truncated         the file ends before the image data does
    too_small         shorter side below data.min_image_size (default: data.resolution)

Images are decoded with PIL, converted to RGB, resized so the shorter side equals the training
resolution (bicubic, antialiased) and center-cropped to a square: the model's VAE then encodes them.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SKIP_REASONS = ("missing_caption", "empty_caption", "bad_manifest_row", "unreadable", "truncated", "too_small")


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
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
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


def load_image(path: str | Path, resolution: int, min_size: int = 0) -> np.ndarray:
    """Decode, check, resize (shorter side = resolution) and center-crop: float32 [3, R, R] in [0, 1].

    Raises :class:`ImageSkip` for the reasons of SKIP_REASONS instead of any decoder error.
    """
    from PIL import Image, UnidentifiedImageError

    min_size = min_size or resolution
    try:
        with Image.open(path) as im:
            im.load()  # full decode: a truncated file fails here, not later in a worker
            rgb = im.convert("RGB")
    except FileNotFoundError as e:
        raise ImageSkip("unreadable", f"{path}: file not found") from e
    except UnidentifiedImageError as e:
        raise ImageSkip("unreadable", f"{path}: not an image PIL can identify") from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated" if "truncat" in str(e).lower() or "broken data stream" in str(e).lower() else "unreadable"
        raise ImageSkip(reason, f"{path}: {e}") from e
    w, h = rgb.size
    if min(w, h) < min_size:
        raise ImageSkip("too_small", f"{path}: {w}x{h}, shorter side below {min_size}")
    # torchvision's Resize(int) / CenterCrop arithmetic: long side int(R * long / short), offsets rounded.
    if w <= h:
        nw, nh = resolution, int(resolution * h / w)
    else:
        nw, nh = int(resolution * w / h), resolution
    rgb = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - resolution) / 2.0)), int(round((nh - resolution) / 2.0))
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def check_images(records: list[ImageRecord], resolution: int, min_size: int = 0
                 ) -> tuple[list[ImageRecord], list[Skipped]]:
    """Decode every record once; the usable ones in order, and the rest with their reasons."""
    usable, skipped = [], []
    for r in records:
        try:
            load_image(r.path, resolution, min_size)
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
                check: Callable[[list[ImageRecord], int, int], tuple[list[ImageRecord], list[Skipped]]] = check_images,
                ) -> ImageScan:
    """List and decode-check every image, before training starts.

    ``check`` decodes the listed records (default: :func:`check_images`, in this process;
    ``pipeline.ray.images.scan_images`` passes a Ray Data map). Raises ConfigError (a ValueError)
    naming ``data.images`` when no image is usable: that is a configuration error, found before any
    learner or actor starts.
    """
    records, skipped = list_images(source)
    usable, more = check(records, resolution, min_size) if records else ([], [])
    scan = ImageScan(usable, skipped + more)
    if not usable:
        raise ConfigError(f"data.images: no usable image in {source} ({len(scan.skipped)} skipped: "
                          f"{ {k: v for k, v in scan.counts.items() if v} }); expected images of at least "
                          f"{min_size or resolution} px on the shorter side with non-empty captions")
    return scan
