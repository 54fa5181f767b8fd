"""The pre-flight scan of ``data.images`` as a Ray Data map: decoding thousands of files on the cluster's
CPUs instead of the driver's. Same result as :func:`pipeline.images.scan_images` in one process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import ray

from pipeline.images import DEFAULT_MAX_IMAGE_PIXELS, ImageRecord, ImageScan, ImageSkip, Skipped, load_image
from pipeline.images import scan_images as scan_images_local

CHECK_BATCH = 16  # files per map task: decoding dominates, so small batches spread the work


def _check_batch(batch: dict[str, np.ndarray], resolution: int, min_size: int, max_pixels: int
                 ) -> dict[str, np.ndarray]:
    """(index, path) rows -> (index, reason, detail); reason "" for a usable image. load_image turns
    every decoder exception into an ImageSkip, so one file cannot fail the map task."""
    reasons, details = [], []
    for p in batch["path"]:
        try:
            load_image(str(p), resolution, min_size, max_pixels)
            reasons.append("")
            details.append("")
        except ImageSkip as e:
            reasons.append(e.reason)
            details.append(e.detail)
    return {"index": batch["index"], "reason": np.asarray(reasons, dtype=object),
            "detail": np.asarray(details, dtype=object)}


def check_images_ray(records: list[ImageRecord], resolution: int, min_size: int = 0,
                     max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[list[ImageRecord], list[Skipped]]:
    """:func:`pipeline.images.check_images` on Ray Data; the usable records keep their listing order."""
    ds = ray.data.from_items([{"index": i, "path": r.path} for i, r in enumerate(records)],
                             override_num_blocks=min(len(records), 64))
    kwargs = {"resolution": resolution, "min_size": min_size, "max_pixels": max_pixels}
    rows = ds.map_batches(_check_batch, fn_kwargs=kwargs, batch_size=CHECK_BATCH).take_all()
    by_index = {int(r["index"]): (str(r["reason"]), str(r["detail"])) for r in rows}
    usable, skipped = [], []
    for i, r in enumerate(records):
        reason, detail = by_index[i]
        if reason:
            skipped.append(Skipped(r.path, reason, detail))
        else:
            usable.append(r)
    return usable, skipped


def scan_images(source: str | Path, resolution: int, min_size: int = 0,
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageScan:
    """:func:`pipeline.images.scan_images` with the decode checks on Ray Data (Ray must be initialised)."""
    return scan_images_local(source, resolution, min_size, check=check_images_ray, max_pixels=max_pixels)
