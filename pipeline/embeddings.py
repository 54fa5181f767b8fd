"""`srpo preprocess`: a prompts file -> a folder of frozen text embeddings that training reads.

The text encoders (FLUX: CLIP-L + T5-XXL, about 5B parameters; Qwen-Image: Qwen2.5-VL-7B) are frozen,
so encoding every prompt once and storing the result takes them out of the training job entirely
(data.prompt_embeddings). Nothing here knows a family's columns: they are the model family's
``conditioning_to_arrays`` columns, with the per-row shapes of its ``conditioning_shapes``, recorded in
meta.json (``shapes``) when the folder is created and read back from there.
This module is the folder format and everything that needs no cluster (planning, resuming, reading);
the encoding itself runs on Ray Data in pipeline/ray/preprocess.py.

Folder layout (``out_dir``)::

    meta.json                       model identity (family, path, max_sequence_length), shapes (column ->
                                    per-row shape), format, counts
    plan.parquet                    prompt_index, caption, clip_truncated, t5_truncated of every prompt
                                    ever planned (written before encoding, so a crashed run resumes
                                    with the same indices instead of leaving gaps)
    part-<first_index:08d>.parquet  encoded rows; each holds one contiguous prompt_index run

Part schema: prompt_index int64, caption string, then the adapter's conditioning arrays, one float32
ray.data tensor column each (``conditioning_to_arrays``; FLUX: prompt_embeds [L, d_t5], pooled
[d_clip]; Qwen-Image: prompt_embeds [L, d], prompt_mask [L], negative_embeds [L, d], negative_mask [L]),
clip_truncated bool, t5_truncated bool (names kept from the first format: a prompt cut by a text
encoder's own token limit, and one longer than model.max_sequence_length; the family's
``truncation_flags`` says what each means for it). The tensor columns
use Ray's Arrow tensor extension (``ArrowTensorArray``), so ``ray.data.read_parquet`` gives numpy
[B, L, d] back; plain pyarrow sees the storage (a flat float32 list per row) and reshapes it with
the shapes in meta.json. Parts and meta.json are written to a ``*.tmp`` name, then renamed (atomic
on POSIX), so a killed run leaves only complete files plus ``*.tmp`` debris that the next run deletes.
Parts are written by the encoding actors (pipeline/ray/preprocess.py), so on a multi-node cluster
``out_dir`` must be shared storage (as for any Ray Data write).

Sorted part names are prompt_index order because every part is one contiguous run of indices and
two parts never overlap: readers need no global sort.
"""
from __future__ import annotations

import bisect
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import Config, ConfigError
from pipeline.models import family_class

FORMAT_VERSION = 1
META = "meta.json"
PLAN = "plan.parquet"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
FIELD = "data.prompt_embeddings"


@dataclass
class PreprocessReport:
    """What one ``preprocess`` call saw and did. Counts are over the prompts file of this call.

    total_lines: lines (txt) or rows (parquet) in the prompts file; dropped_empty / dropped_duplicate:
    lines dropped as blank or as an exact repeat (after strip) of an earlier line; truncated_clip /
    truncated_t5: unique prompts cut by a text encoder's own token limit (FLUX: CLIP's 77 tokens;
    Qwen-Image: the tokenizer's 1024 after the template) / longer than model.max_sequence_length
    tokens (FLUX: T5; Qwen-Image: Qwen2.5-VL after the template drop), which the encoders see cut
    (the family's ``truncation_flags``); already_done: unique prompts found
    encoded in the folder; encoded: prompts encoded now (including any a crashed earlier run had
    planned); parts_written: part files written now.
    """

    total_lines: int = 0
    dropped_empty: int = 0
    dropped_duplicate: int = 0
    truncated_clip: int = 0
    truncated_t5: int = 0
    already_done: int = 0
    encoded: int = 0
    parts_written: int = 0

    @property
    def unique(self) -> int:
        return self.total_lines - self.dropped_empty - self.dropped_duplicate


# ------------------------------------------------------------------------------------------------
# Reading the prompts file
# ------------------------------------------------------------------------------------------------


def read_raw_captions(path: str | Path) -> list[str | None]:
    """Every line (txt) or ``caption`` value (parquet) of a prompts file, unfiltered, so drops can be counted."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.prompts: {str(p)!r} does not exist; expected a .txt (one prompt a line) "
                          "or a .parquet with a 'caption' column")
    if p.suffix == ".parquet":
        schema = pq.read_schema(p)
        if "caption" not in schema.names:
            raise ConfigError(f"data.prompts: {p} has columns {schema.names}; expected a 'caption' column")
        return [None if c is None else str(c) for c in pq.read_table(p, columns=["caption"]).column(0).to_pylist()]
    return p.read_text(encoding="utf-8").splitlines()


def unique_captions(raw: Iterable[str | None]) -> tuple[list[str], int, int]:
    """(captions in first-occurrence order, dropped_empty, dropped_duplicate); compared after strip.

    Duplicates are dropped because one caption has one embedding: keeping repeats would only weight
    some prompts more, which is the sampler's business, not the cache's.
    """
    seen: dict[str, None] = {}
    empty = dup = 0
    for line in raw:
        text = (line or "").strip()
        if not text:
            empty += 1
        elif text in seen:
            dup += 1
        else:
            seen[text] = None
    return list(seen), empty, dup


# ------------------------------------------------------------------------------------------------
# Truncation flags (the tokenizers only: no encoder is loaded in the driver)
# ------------------------------------------------------------------------------------------------


def load_tokenizers(cfg: Config) -> tuple[Any, ...]:
    """The model family's tokenizers (``load_tokenizers``), no encoder loaded."""
    try:
        return family_class(cfg.model.family).load_tokenizers(cfg.model.path)
    except FileNotFoundError as e:
        raise ConfigError(f"model.path: {e}") from e


def truncation_flags(cfg: Config, tokenizers: tuple[Any, ...],
                     captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(clip_truncated, t5_truncated) per caption: cut by a text encoder's own limit, and longer than
    model.max_sequence_length, as the family's ``encode_prompts`` cuts them."""
    if not captions:
        return np.zeros(0, bool), np.zeros(0, bool)
    return family_class(cfg.model.family).truncation_flags(tokenizers, captions, cfg.model.max_sequence_length)


# ------------------------------------------------------------------------------------------------
# meta.json and compatibility
# ------------------------------------------------------------------------------------------------


def _identity(cfg: Config) -> dict[str, Any]:
    """The fields a folder is bound to: embeddings of another family, model or text length cannot be mixed in."""
    return {"model.family": cfg.model.family, "model.path": str(Path(cfg.model.path).resolve()),
            "model.max_sequence_length": int(cfg.model.max_sequence_length)}


def embedding_shapes(cfg: Config) -> dict[str, list[int]]:
    """Per-row shapes of the conditioning arrays, from the encoders' configs (none is loaded)."""
    try:
        return family_class(cfg.model.family).conditioning_shapes(cfg.model.path, cfg.model.max_sequence_length)
    except ValueError as e:
        raise ConfigError(f"model.path: {e}") from e


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / META
    if not path.is_file():
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} has no {META}; it is not a `srpo preprocess` output folder")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{FIELD}: {path} has format_version {meta.get('format_version')!r}; expected "
                          f"{FORMAT_VERSION} (rerun `srpo preprocess` into a new folder)")
    return meta


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    _write_atomic(out_dir / META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def check_compatible(out_dir: str | Path, cfg: Config, require_complete: bool = True) -> dict[str, Any]:
    """Raise ConfigError unless ``out_dir`` holds embeddings of this config's text encoders.

    Embeddings are only valid for the model family, model and sequence length that made them; training
    from a folder of another model would silently condition on the wrong text features (another
    family's columns would not even load). The folder's columns and shapes must also be the ones the
    family gives this model folder now. ``require_complete`` (what training wants) also refuses a
    folder whose last preprocess run did not finish. Returns the meta.
    """
    meta = read_meta(out_dir)
    for key, want in _identity(cfg).items():
        have = meta.get(key)
        if have != want:
            raise ConfigError(f"{FIELD}: {str(out_dir)!r} was made with {key}={have!r}, this config has "
                              f"{key}={want!r}; rerun `srpo preprocess` into another folder or use the "
                              "matching config")
    if meta.get("shapes") != (want := embedding_shapes(cfg)):
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} holds the columns {meta.get('shapes')!r}; {cfg.model.path} "
                          f"gives {want!r} now (its text encoder changed?); rerun `srpo preprocess` into another folder")
    if require_complete and not meta.get("complete", False):
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} is incomplete (a `srpo preprocess` run did not finish); "
                          "rerun it with the same config to encode the rest")
    return meta


# ------------------------------------------------------------------------------------------------
# Part files
# ------------------------------------------------------------------------------------------------


def part_name(first_index: int) -> str:
    return f"{PART_PREFIX}{first_index:08d}{PART_SUFFIX}"


def part_first_index(path: Path) -> int:
    return int(path.name[len(PART_PREFIX):-len(PART_SUFFIX)])


def part_files(out_dir: str | Path) -> list[Path]:
    """Complete part files in prompt_index order (numeric, so indices past 8 digits still sort)."""
    return sorted((p for p in Path(out_dir).glob(f"{PART_PREFIX}*{PART_SUFFIX}") if p.is_file()),
                  key=part_first_index)


def clean_tmp(out_dir: str | Path) -> int:
    """Delete ``*.tmp`` debris of a killed run (never complete data: renames are the commit)."""
    n = 0
    for p in Path(out_dir).glob(f"*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def contiguous_runs(indices: np.ndarray) -> list[slice]:
    """Slices of a sorted index array where the values step by exactly 1."""
    if len(indices) == 0:
        return []
    cuts = np.flatnonzero(np.diff(indices) != 1) + 1
    bounds = [0, *cuts.tolist(), len(indices)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _read_columns(files: Sequence[Path], columns: list[str]) -> pa.Table:
    tables = [pq.read_table(f, columns=columns) for f in files]
    if not tables:
        return pa.table({c: pa.array([], pa.int64() if c == "prompt_index" else pa.string()) for c in columns})
    return pa.concat_tables(tables)


def read_captions(out_dir: str | Path) -> list[str]:
    """Encoded captions in prompt_index order; reads only the caption/prompt_index columns.

    Position i is prompt_index i (what the training stream relies on to look embeddings up), which
    holds for every folder a preprocess run finished; a folder with gaps (a run was killed) raises.
    """
    table = _read_columns(part_files(out_dir), ["prompt_index", "caption"])
    index = table.column("prompt_index").to_numpy()
    if not np.array_equal(index, np.arange(len(index))):
        gap = int(np.flatnonzero(index != np.arange(len(index)))[0])
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} is missing prompt_index {gap} (a `srpo preprocess` run did "
                          "not finish); rerun it with the same config to encode the rest")
    return [str(c) for c in table.column("caption").to_pylist()]


def read_index(out_dir: str | Path) -> dict[int, str]:
    """prompt_index -> caption of the encoded rows."""
    table = _read_columns(part_files(out_dir), ["prompt_index", "caption"])
    return dict(zip(table.column("prompt_index").to_pylist(), table.column("caption").to_pylist()))


def _column_numpy(column: pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """A tensor column as numpy [n, *shape], with or without Ray's extension types registered."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(arr), *shape)


@dataclass
class _PartIndex:
    """meta.json and the part listing of a folder, cached: the lookup stage calls load_embeddings per
    batch, and globbing thousands of part names per batch would dominate."""

    meta_mtime_ns: int
    meta: dict[str, Any]
    files: list[Path]
    firsts: list[int]

    def locate(self, prompt_index: int) -> int:
        """Position in ``files`` of the part that can hold ``prompt_index``, -1 if none."""
        return bisect.bisect_right(self.firsts, prompt_index) - 1


_PART_INDEX: dict[str, _PartIndex] = {}


def _part_index(out_dir: str | Path, refresh: bool = False) -> _PartIndex:
    key = str(Path(out_dir).resolve())
    meta_path = Path(key) / META
    mtime = meta_path.stat().st_mtime_ns if meta_path.is_file() else -1
    cached = _PART_INDEX.get(key)
    if refresh or cached is None or cached.meta_mtime_ns != mtime:
        files = part_files(key)
        cached = _PartIndex(mtime, read_meta(key), files,
                            [part_first_index(f) for f in files])
        _PART_INDEX[key] = cached
    return cached


def tensor_columns(meta: dict[str, Any]) -> list[str]:
    """The conditioning columns of a folder: the keys of its meta.json ``shapes`` (written from the model
    family's ``conditioning_shapes``), so a folder reads back whatever family made it."""
    return list(meta["shapes"])


def _load_rows(index: _PartIndex, wanted: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """prompt_index -> {column: row array} for the wanted indices found in the listed parts."""
    shapes = index.meta["shapes"]
    by_part: dict[int, list[int]] = {}
    for i in wanted:
        k = index.locate(i)
        if k >= 0:
            by_part.setdefault(k, []).append(i)
    rows: dict[int, dict[str, np.ndarray]] = {}
    for k, want in by_part.items():
        table = pq.read_table(index.files[k], columns=["prompt_index", *shapes])
        cols = {c: _column_numpy(table.column(c), shape) for c, shape in shapes.items()}
        pos = {int(v): j for j, v in enumerate(table.column("prompt_index").to_numpy())}
        rows.update({i: {c: a[pos[i]] for c, a in cols.items()} for i in want if i in pos})
    return rows


def load_embeddings(out_dir: str | Path, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """{column: float32 [n, *shape]} of these prompt_index values, in the given order: the model family's
    conditioning arrays (FLUX: prompt_embeds [n, L, d_t5], pooled [n, d_clip]), ready for
    ``conditioning_from_arrays``.

    Plain pyarrow (no Ray): reads only the parts holding the requested indices. Raises KeyError
    naming the first index the folder does not hold.
    """
    wanted = [int(i) for i in indices]
    index = _part_index(out_dir)
    try:
        rows = _load_rows(index, wanted)
    except FileNotFoundError:  # the folder changed under the cached listing
        rows = {}
    if len(rows) < len(set(wanted)):  # parts written since the listing was cached: list again once
        index = _part_index(out_dir, refresh=True)
        rows = _load_rows(index, wanted)
    missing = [i for i in wanted if i not in rows]
    if missing:
        raise KeyError(f"{out_dir}: prompt_index {missing[0]} is not encoded")
    shapes = index.meta["shapes"]
    if not wanted:
        return {c: np.zeros((0, *shape), np.float32) for c, shape in shapes.items()}
    return {c: np.stack([rows[i][c] for i in wanted]) for c in shapes}


# ------------------------------------------------------------------------------------------------
# The plan: index assignment, written before encoding
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Every prompt the folder is meant to hold (prompt_index -> caption + truncation flags)."""

    index: np.ndarray  # int64, ascending
    caption: list[str]
    clip_truncated: np.ndarray
    t5_truncated: np.ndarray

    @staticmethod
    def empty() -> "Plan":
        return Plan(np.zeros(0, np.int64), [], np.zeros(0, bool), np.zeros(0, bool))

    def __len__(self) -> int:
        return len(self.caption)

    def next_index(self) -> int:
        return int(self.index.max()) + 1 if len(self) else 0

    def extend(self, captions: list[str], clip: np.ndarray, t5: np.ndarray) -> "Plan":
        start = self.next_index()
        return Plan(np.concatenate([self.index, np.arange(start, start + len(captions), dtype=np.int64)]),
                    self.caption + list(captions), np.concatenate([self.clip_truncated, clip]),
                    np.concatenate([self.t5_truncated, t5]))


def read_plan(out_dir: Path) -> Plan:
    """The plan, rebuilt from the parts when plan.parquet is absent (it is written before any part)."""
    cols = ["prompt_index", "caption", "clip_truncated", "t5_truncated"]
    path = out_dir / PLAN
    table = pq.read_table(path, columns=cols) if path.is_file() else _read_columns(part_files(out_dir), cols)
    if table.num_rows == 0:
        return Plan.empty()
    table = table.sort_by("prompt_index")
    return Plan(table.column("prompt_index").to_numpy().astype(np.int64),
                [str(c) for c in table.column("caption").to_pylist()],
                table.column("clip_truncated").to_numpy(zero_copy_only=False).astype(bool),
                table.column("t5_truncated").to_numpy(zero_copy_only=False).astype(bool))


def write_plan(out_dir: Path, plan: Plan) -> None:
    table = pa.table({"prompt_index": pa.array(plan.index, pa.int64()), "caption": pa.array(plan.caption, pa.string()),
                      "clip_truncated": pa.array(plan.clip_truncated, pa.bool_()),
                      "t5_truncated": pa.array(plan.t5_truncated, pa.bool_())})
    tmp = out_dir / f"{PLAN}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / PLAN)


# ------------------------------------------------------------------------------------------------
# A run, before and after encoding (pipeline/ray/preprocess.py encodes in between)
# ------------------------------------------------------------------------------------------------


def _prepare_folder(out_dir: Path, cfg: Config) -> dict[str, Any]:
    """Create or re-open ``out_dir``: check identity, drop tmp debris, mark it incomplete."""
    if (out_dir / META).is_file():
        meta = check_compatible(out_dir, cfg, require_complete=False)
    elif out_dir.is_dir() and any(not p.name.endswith(TMP_SUFFIX) for p in out_dir.iterdir()):
        # Never write parts into somebody else's folder, nor adopt parts of unknown provenance.
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} is not empty and has no {META}; expected an empty or "
                          "new folder, or the output folder of an earlier `srpo preprocess`")
    else:
        meta = {"format_version": FORMAT_VERSION, **_identity(cfg), "shapes": embedding_shapes(cfg),
                "dtype": "float32"}
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_tmp(out_dir)
    meta["complete"] = False
    write_meta(out_dir, meta)
    return meta


@dataclass
class PreprocessJob:
    """A planned preprocess run: the folder (marked incomplete), its meta, every planned prompt, the
    ones left to encode, and the report's counts so far (``encoded`` / ``parts_written`` come later)."""

    out: Path
    meta: dict[str, Any]
    plan: Plan
    todo: Plan
    report: PreprocessReport


def _read_prompts_file(cfg: Config, prompts: str | Path | None) -> tuple[list[str], PreprocessReport]:
    prompts_path = prompts if prompts is not None else cfg.data.prompts
    if not prompts_path:
        raise ConfigError("data.prompts: missing; expected a prompts file (.txt or .parquet) to preprocess")
    raw = read_raw_captions(prompts_path)
    captions, empty, dup = unique_captions(raw)
    if not captions:
        raise ConfigError(f"data.prompts: {str(prompts_path)!r} has no non-empty prompt; expected at least one caption")
    return captions, PreprocessReport(total_lines=len(raw), dropped_empty=empty, dropped_duplicate=dup)


def _extend_plan(cfg: Config, out: Path, meta: dict[str, Any], captions: list[str]) -> Plan:
    """The folder's plan plus the captions it does not hold yet (indices after the largest planned one)."""
    plan = read_plan(out)
    planned = set(plan.caption)
    new = [c for c in captions if c not in planned]
    if new:
        tokenizers = load_tokenizers(cfg)
        plan = plan.extend(new, *truncation_flags(cfg, tokenizers, new))
        write_plan(out, plan)
    elif len(plan) and not (out / PLAN).is_file():
        write_plan(out, plan)  # rebuilt from the parts: keep it for the next run
    return plan


def plan_preprocess(cfg: Config, out_dir: str | Path, prompts: str | Path | None = None) -> PreprocessJob:
    """Everything of ``srpo preprocess`` before encoding (no Ray): read the prompts file, open or create
    the folder, extend and write the plan, and find the planned prompts not encoded yet.

    Prompts already in the folder (by caption) are skipped; new ones get indices after the largest
    planned one, in first-occurrence order. Prompts the folder holds but the file no longer lists
    are kept (the folder only grows).
    """
    captions, report = _read_prompts_file(cfg, prompts)
    out = Path(out_dir).resolve()
    meta = _prepare_folder(out, cfg)
    plan = _extend_plan(cfg, out, meta, captions)
    done = set(read_index(out))
    by_caption = {c: (int(i), bool(a), bool(b))
                  for i, c, a, b in zip(plan.index, plan.caption, plan.clip_truncated, plan.t5_truncated)}
    report.truncated_clip = sum(by_caption[c][1] for c in captions)
    report.truncated_t5 = sum(by_caption[c][2] for c in captions)
    report.already_done = sum(by_caption[c][0] in done for c in captions)
    todo_mask = np.asarray([int(i) not in done for i in plan.index], dtype=bool)
    todo = Plan(plan.index[todo_mask], [c for c, m in zip(plan.caption, todo_mask) if m],
                plan.clip_truncated[todo_mask], plan.t5_truncated[todo_mask])
    report.encoded = len(todo)
    return PreprocessJob(out, meta, plan, todo, report)


def finish_preprocess(job: PreprocessJob) -> PreprocessReport:
    """Check every planned prompt is encoded, then record the counts and mark the folder complete."""
    index = read_index(job.out)
    missing = [int(i) for i in job.plan.index if int(i) not in index]
    if missing:
        raise RuntimeError(f"{job.out}: {len(missing)} planned prompts were not written (first prompt_index "
                           f"{missing[0]}); rerun `srpo preprocess` to encode them")
    plan, meta = job.plan, job.meta
    meta["counts"] = {"prompts": len(index), "parts": len(part_files(job.out)),
                      "clip_truncated": int(plan.clip_truncated.sum()), "t5_truncated": int(plan.t5_truncated.sum())}
    meta["complete"] = True
    write_meta(job.out, meta)
    return job.report


def report_dict(report: PreprocessReport) -> dict[str, int]:
    return {**asdict(report), "unique": report.unique}
