"""`srpo preprocess`: a prompts file -> a folder of frozen text embeddings that training reads.

FLUX's text encoders (CLIP-L + T5-XXL, about 5B parameters) are frozen, so encoding every prompt
once and storing the result takes them out of the training job entirely (data.prompt_embeddings).

Folder layout (``out_dir``)::

    meta.json                       model identity (path, max_sequence_length), shapes, format, counts
    plan.parquet                    prompt_index, caption, clip_truncated, t5_truncated of every prompt
                                    ever planned (written before encoding, so a crashed run resumes
                                    with the same indices instead of leaving gaps)
    part-<first_index:08d>.parquet  encoded rows; each holds one contiguous prompt_index run

Part schema: prompt_index int64, caption string, prompt_embeds ray.data tensor [L, d_t5] float32,
pooled ray.data tensor [d_clip] float32, clip_truncated bool, t5_truncated bool. The tensor columns
use Ray's Arrow tensor extension (``ArrowTensorArray``), so ``ray.data.read_parquet`` gives numpy
[B, L, d] back; plain pyarrow sees the storage (a flat float32 list per row) and reshapes it with
the shapes in meta.json. Parts and meta.json are written to a ``*.tmp`` name, then renamed (atomic
on POSIX), so a killed run leaves only complete files plus ``*.tmp`` debris that the next run deletes.
Parts are written by the encoding actors, so on a multi-node cluster ``out_dir`` must be shared
storage (as for any Ray Data write).

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
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from pipeline.config import Config, ConfigError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data
    import torch

FORMAT_VERSION = 1
META = "meta.json"
PLAN = "plan.parquet"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
TMP_SUFFIX = ".tmp"
FIELD = "data.prompt_embeddings"
TENSOR_COLUMNS = ("prompt_embeds", "pooled")


@dataclass
class PreprocessReport:
    """What one ``preprocess`` call saw and did. Counts are over the prompts file of this call.

    total_lines: lines (txt) or rows (parquet) in the prompts file; dropped_empty / dropped_duplicate:
    lines dropped as blank or as an exact repeat (after strip) of an earlier line; truncated_clip /
    truncated_t5: unique prompts longer than the CLIP limit (77 tokens with specials) or the T5 limit
    (model.max_sequence_length), which the encoders see cut; already_done: unique prompts found
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
        import pyarrow.parquet as pq

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


def load_tokenizers(model_path: str | Path) -> tuple[Any, Any]:
    """(CLIP tokenizer, T5 tokenizer) from the model folder, as FluxAdapter.load reads them."""
    from transformers import AutoTokenizer

    root = Path(model_path)
    for sub in ("tokenizer", "tokenizer_2"):
        if not (root / sub).is_dir():
            raise ConfigError(f"model.path: {root / sub} missing; expected the FLUX.1-dev component '{sub}'")
    return (AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
            AutoTokenizer.from_pretrained(root, subfolder="tokenizer_2", local_files_only=True))


def token_lengths(tokenizer: Any, captions: Sequence[str], chunk: int = 4096) -> np.ndarray:
    """Untruncated token counts including special tokens (what the encoder would see without a limit)."""
    import transformers

    out: list[int] = []
    # Tokenizing past model_max_length on purpose: silence the "sequence too long" warning.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        for i in range(0, len(captions), chunk):
            ids = tokenizer(list(captions[i:i + chunk]), truncation=False, add_special_tokens=True)["input_ids"]
            out.extend(len(x) for x in ids)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return np.asarray(out, dtype=np.int64)


def truncation_flags(tokenizers: tuple[Any, Any], max_sequence_length: int,
                     captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(clip_truncated, t5_truncated) per caption, matching FluxAdapter.encode_prompts's limits."""
    if not captions:
        return np.zeros(0, bool), np.zeros(0, bool)
    clip_tok, t5_tok = tokenizers
    clip = token_lengths(clip_tok, captions) > clip_tok.model_max_length
    t5 = token_lengths(t5_tok, captions) > max_sequence_length
    return clip, t5


# ------------------------------------------------------------------------------------------------
# meta.json and compatibility
# ------------------------------------------------------------------------------------------------


def _identity(cfg: Config) -> dict[str, Any]:
    """The fields a folder is bound to: embeddings of another model or T5 length cannot be mixed in."""
    return {"model.family": cfg.model.family, "model.path": str(Path(cfg.model.path).resolve()),
            "model.max_sequence_length": int(cfg.model.max_sequence_length)}


def embedding_shapes(cfg: Config) -> dict[str, list[int]]:
    """Per-row shapes from the encoders' configs, known before any encoder is loaded."""
    root = Path(cfg.model.path)
    try:
        d_t5 = int(json.loads((root / "text_encoder_2" / "config.json").read_text())["d_model"])
        d_clip = int(json.loads((root / "text_encoder" / "config.json").read_text())["hidden_size"])
    except (OSError, KeyError, ValueError) as e:
        raise ConfigError(f"model.path: cannot read the text encoders' config.json under {root} ({e}); "
                          "expected text_encoder/config.json (hidden_size) and text_encoder_2/config.json "
                          "(d_model)") from e
    return {"prompt_embeds": [int(cfg.model.max_sequence_length), d_t5], "pooled": [d_clip]}


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

    Embeddings are only valid for the model and T5 length that made them; training from a folder of
    another model would silently condition on the wrong text features. ``require_complete`` (what
    training wants) also refuses a folder whose last preprocess run did not finish. Returns the meta.
    """
    meta = read_meta(out_dir)
    for key, want in _identity(cfg).items():
        have = meta.get(key)
        if have != want:
            raise ConfigError(f"{FIELD}: {str(out_dir)!r} was made with {key}={have!r}, this config has "
                              f"{key}={want!r}; rerun `srpo preprocess` into another folder or use the "
                              "matching config")
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


def _tensor_array(x: np.ndarray) -> "pa.Array":
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def write_parts(out_dir: str | Path, batch: dict[str, np.ndarray]) -> list[str]:
    """Write an encoded batch as one part per contiguous prompt_index run; returns the part names.

    Splitting at gaps is what keeps sorted part names in prompt_index order whatever rows Ray Data
    puts together in a batch (a resumed run encodes scattered leftovers plus appended prompts).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    order = np.argsort(np.asarray(batch["prompt_index"], dtype=np.int64), kind="stable")
    cols = {k: np.asarray(batch[k])[order] for k in
            ("prompt_index", "caption", "prompt_embeds", "pooled", "clip_truncated", "t5_truncated")}
    names = []
    for run in contiguous_runs(cols["prompt_index"]):
        table = pa.table({
            "prompt_index": pa.array(cols["prompt_index"][run], pa.int64()),
            "caption": pa.array([str(c) for c in cols["caption"][run]], pa.string()),
            "prompt_embeds": _tensor_array(cols["prompt_embeds"][run]),
            "pooled": _tensor_array(cols["pooled"][run]),
            "clip_truncated": pa.array(cols["clip_truncated"][run].astype(bool), pa.bool_()),
            "t5_truncated": pa.array(cols["t5_truncated"][run].astype(bool), pa.bool_()),
        })
        final = Path(out_dir) / part_name(int(cols["prompt_index"][run][0]))
        tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        names.append(final.name)
    return names


def _read_columns(files: Sequence[Path], columns: list[str]) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.parquet as pq

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


def read_embedding_dataset(out_dir: str | Path) -> "ray.data.Dataset":
    """A Ray Dataset of (prompt_index, caption, prompt_embeds [L, d], pooled [d]) in prompt_index order.

    The order is the file order (sorted part names), which is kept downstream when the consumer sets
    ``preserve_order`` (Ray Train's ingest options in pipeline/stream.py do); there is no global sort.
    """
    import ray

    read_meta(out_dir)
    files = part_files(out_dir)
    if not files:
        raise ConfigError(f"{FIELD}: {str(out_dir)!r} has no part files; run `srpo preprocess` first")
    ds = ray.data.read_parquet([str(f) for f in files], partitioning=None)
    return ds.select_columns(["prompt_index", "caption", *TENSOR_COLUMNS])  # pushed down into the read


def _column_numpy(column: "pa.ChunkedArray", shape: Sequence[int]) -> np.ndarray:
    """A tensor column as numpy [n, *shape], with or without Ray's extension types registered."""
    import pyarrow as pa

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


def _load_rows(index: _PartIndex, wanted: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """prompt_index -> (embeds, pooled) for the wanted indices found in the listed parts."""
    import pyarrow.parquet as pq

    shapes = index.meta["shapes"]
    by_part: dict[int, list[int]] = {}
    for i in wanted:
        k = index.locate(i)
        if k >= 0:
            by_part.setdefault(k, []).append(i)
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k, want in by_part.items():
        table = pq.read_table(index.files[k], columns=["prompt_index", *TENSOR_COLUMNS])
        embeds = _column_numpy(table.column("prompt_embeds"), shapes["prompt_embeds"])
        pooled = _column_numpy(table.column("pooled"), shapes["pooled"])
        pos = {int(v): j for j, v in enumerate(table.column("prompt_index").to_numpy())}
        rows.update({i: (embeds[pos[i]], pooled[pos[i]]) for i in want if i in pos})
    return rows


def load_embeddings(out_dir: str | Path, indices: Sequence[int]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(prompt_embeds [n, L, d_t5], pooled [n, d_clip]) of these prompt_index values, in the given order.

    Plain pyarrow (no Ray): reads only the parts holding the requested indices. Raises KeyError
    naming the first index the folder does not hold.
    """
    import torch

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
        return torch.zeros(0, *shapes["prompt_embeds"]), torch.zeros(0, *shapes["pooled"])
    return (torch.from_numpy(np.stack([rows[i][0] for i in wanted])),
            torch.from_numpy(np.stack([rows[i][1] for i in wanted])))


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
    import pyarrow.parquet as pq

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
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt_index": pa.array(plan.index, pa.int64()), "caption": pa.array(plan.caption, pa.string()),
                      "clip_truncated": pa.array(plan.clip_truncated, pa.bool_()),
                      "t5_truncated": pa.array(plan.t5_truncated, pa.bool_())})
    tmp = out_dir / f"{PLAN}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    pq.write_table(table, tmp)
    os.replace(tmp, out_dir / PLAN)


# ------------------------------------------------------------------------------------------------
# Encoding on Ray Data
# ------------------------------------------------------------------------------------------------


def _embed_and_write_stage():
    """TextEmbedStage plus the part write, as one actor class (imported lazily: actors/ pulls in torch)."""
    from actors.rollout import TextEmbedStage

    class EmbedAndWrite(TextEmbedStage):
        """Encode a batch and write it where it was computed: the embeddings (8 MiB a prompt for
        FLUX.1-dev) never travel through the driver, which only sees one small row per part."""

        def __init__(self, cfg_dict: dict[str, Any], out_dir: str) -> None:
            super().__init__(cfg_dict)
            self.out_dir = out_dir

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            batch = super().__call__(batch)
            names = write_parts(self.out_dir, batch)
            rows = np.zeros(len(names), np.int64)
            if len(names):
                rows[0] = len(batch["caption"])  # progress: the batch's rows on its first part
            return {"part": np.asarray(names), "rows": rows}

    return EmbedAndWrite


def encode_missing(cfg: Config, out_dir: Path, todo: Plan, batch_size: int, num_actors: int,
                   progress: bool) -> int:
    """Encode ``todo`` through an actor pool of text encoders; returns the number of parts written."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    rows = [{"prompt_index": int(i), "caption": c, "clip_truncated": bool(a), "t5_truncated": bool(b)}
            for i, c, a, b in zip(todo.index, todo.caption, todo.clip_truncated, todo.t5_truncated)]
    n_batches = -(-len(rows) // batch_size)
    actors = max(1, min(num_actors, n_batches))
    ctx = DataContext.get_current()
    saved_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    parts = 0
    try:
        ds = ray.data.from_items(rows, override_num_blocks=min(n_batches, 256))
        ds = ds.map_batches(_embed_and_write_stage(), fn_constructor_args=(cfg.to_dict(), str(out_dir)),
                            batch_size=batch_size, compute=ActorPoolStrategy(min_size=actors, max_size=actors),
                            num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)
        bar = _progress_bar(len(rows), progress)
        for row in ds.iter_rows():
            parts += 1
            bar.update(int(row["rows"]))
        bar.close()
    finally:
        ctx.enable_progress_bars = saved_bars
    return parts


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="encode prompts", unit="prompt", disable=not enabled)


# ------------------------------------------------------------------------------------------------
# The entry point
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


def preprocess(cfg: Config, out_dir: str | Path, prompts: str | Path | None = None, batch_size: int = 16,
               num_actors: int | None = None, progress: bool = True) -> PreprocessReport:
    """Encode the prompts file into ``out_dir`` (see the module docstring), resuming what is there.

    Ray must be initialised (``pipeline.ray.driver.connect_ray``) when anything is left to encode.
    Prompts already in the folder (by caption) are skipped; new ones get indices after the largest
    planned one, in first-occurrence order. Prompts the folder holds but the file no longer lists
    are kept (the folder only grows). One run per folder at a time: a run deletes the ``*.tmp``
    files it finds, which would be another live run's unfinished parts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}, expected >= 1")
    prompts_path = prompts if prompts is not None else cfg.data.prompts
    if not prompts_path:
        raise ConfigError("data.prompts: missing; expected a prompts file (.txt or .parquet) to preprocess")
    out = Path(out_dir).resolve()
    raw = read_raw_captions(prompts_path)
    captions, empty, dup = unique_captions(raw)
    if not captions:
        raise ConfigError(f"data.prompts: {str(prompts_path)!r} has no non-empty prompt; expected at least one caption")
    report = PreprocessReport(total_lines=len(raw), dropped_empty=empty, dropped_duplicate=dup)

    meta = _prepare_folder(out, cfg)
    plan = read_plan(out)
    planned = set(plan.caption)
    new = [c for c in captions if c not in planned]
    if new:
        tokenizers = load_tokenizers(cfg.model.path)
        meta["clip_max_length"] = int(tokenizers[0].model_max_length)
        plan = plan.extend(new, *truncation_flags(tokenizers, cfg.model.max_sequence_length, new))
        write_plan(out, plan)
    elif len(plan) and not (out / PLAN).is_file():
        write_plan(out, plan)  # rebuilt from the parts: keep it for the next run

    done = set(read_index(out))
    by_caption = {c: (int(i), bool(a), bool(b))
                  for i, c, a, b in zip(plan.index, plan.caption, plan.clip_truncated, plan.t5_truncated)}
    report.truncated_clip = sum(by_caption[c][1] for c in captions)
    report.truncated_t5 = sum(by_caption[c][2] for c in captions)
    report.already_done = sum(by_caption[c][0] in done for c in captions)

    todo_mask = np.asarray([int(i) not in done for i in plan.index], dtype=bool)
    todo = Plan(plan.index[todo_mask], [c for c, m in zip(plan.caption, todo_mask) if m],
                plan.clip_truncated[todo_mask], plan.t5_truncated[todo_mask])
    if len(todo):
        report.encoded = len(todo)
        report.parts_written = encode_missing(cfg, out, todo, batch_size,
                                              num_actors if num_actors is not None else cfg.rollout.num_actors,
                                              progress)
    _finish(out, meta, plan)
    return report


def _finish(out: Path, meta: dict[str, Any], plan: Plan) -> None:
    """Check every planned prompt is encoded, then record the counts and mark the folder complete."""
    index = read_index(out)
    missing = [int(i) for i in plan.index if int(i) not in index]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} planned prompts were not written (first prompt_index "
                           f"{missing[0]}); rerun `srpo preprocess` to encode them")
    meta["counts"] = {"prompts": len(index), "parts": len(part_files(out)),
                      "clip_truncated": int(plan.clip_truncated.sum()), "t5_truncated": int(plan.t5_truncated.sum())}
    meta["complete"] = True
    write_meta(out, meta)


def report_dict(report: PreprocessReport) -> dict[str, int]:
    return {**asdict(report), "unique": report.unique}
