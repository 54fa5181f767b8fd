"""`srpo preprocess`: counts, bit-exact embeddings, resume/append, compatibility, atomic parts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from pipeline.config import ConfigError
from pipeline.embeddings import (META, check_compatible, contiguous_runs, load_embeddings, part_files, read_captions,
                                 read_index, unique_captions)
from pipeline.ray.preprocess import preprocess, read_embedding_dataset

LONG = ("a highly detailed photograph of an old stone lighthouse on a rocky cliff above a stormy sea at dusk, "
        "with waves crashing against the rocks, seagulls circling the lamp, dramatic clouds lit orange and "
        "purple by the setting sun, a small fishing boat in the distance, wet reflections on the path, "
        "wildflowers bending in the wind, and a lonely keeper standing in the doorway holding a lantern "
        "while a black dog sleeps at his feet beside an old wooden bench")
LINES = ["a photo of a cat", "", "a dog on a beach", "   ", "a photo of a cat", LONG,
         "  a dog on a beach  ", "a red car at night", "a bowl of fruit", "a snowy mountain"]
APPENDED = ["a blue house by a lake", "a photo of a cat", "a green tree in a field"]


def _independent_counts(lines: list[str], model_path: str, max_len: int) -> dict[str, int]:
    """The report's counts, computed here without pipeline.embeddings."""
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer", local_files_only=True)
    t5 = AutoTokenizer.from_pretrained(model_path, subfolder="tokenizer_2", local_files_only=True)
    stripped = [x.strip() for x in lines]
    unique = list(dict.fromkeys(x for x in stripped if x))
    return {
        "total_lines": len(lines), "dropped_empty": sum(not x for x in stripped),
        "dropped_duplicate": sum(bool(x) for x in stripped) - len(unique),
        "truncated_clip": sum(len(clip(c).input_ids) > 77 for c in unique),
        "truncated_t5": sum(len(t5(c).input_ids) > max_len for c in unique),
    }


def _reference(model_path: str, max_len: int, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.models.flux import FluxAdapter

    adapter = FluxAdapter.load(model_path, max_sequence_length=max_len, load_text_encoders=True,
                               load_transformer=False)
    cond = adapter.encode_prompts(captions)
    return cond.prompt_embeds, cond.pooled


def test_unique_captions_and_runs():
    assert unique_captions(["a", " a ", "", None, "b", "  "]) == (["a", "b"], 3, 1)
    runs = contiguous_runs(np.array([2, 3, 5, 6, 7, 10]))
    assert [(r.start, r.stop) for r in runs] == [(0, 2), (2, 5), (5, 6)]


def test_check_compatible_refuses_a_folder_that_is_not_a_preprocess_output(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.prompt_embeddings.*not a `srpo preprocess` output"):
        check_compatible(tmp_path, tiny_cfg())
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"data\.prompt_embeddings.*not empty"):
        preprocess(tiny_cfg(), tmp_path, prompts=Path(__file__), progress=False)


def test_preprocess_counts_embeddings_resume_and_append(tiny_cfg, ray_local, tmp_path):
    from ray.data import DataContext

    cfg = tiny_cfg()
    model, max_len = cfg.model.path, cfg.model.max_sequence_length
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "emb"
    unique = list(dict.fromkeys(x.strip() for x in LINES if x.strip()))
    new = [c for c in APPENDED if c not in unique]

    report = preprocess(cfg, out, prompts=prompts, batch_size=2, num_actors=1, progress=False)
    expected = _independent_counts(LINES, model, max_len)
    assert expected["truncated_clip"] == 1 and expected["truncated_t5"] >= 1  # the file exercises both limits
    assert {k: getattr(report, k) for k in expected} == expected
    assert (report.already_done, report.encoded) == (0, len(unique))
    assert report.parts_written == len(part_files(out)) >= 3
    assert read_captions(out) == unique  # prompt_index = first-occurrence order

    # Bit-identical to the adapter, and the truncation flags of the long prompt are stored.
    loaded = load_embeddings(out, list(range(len(unique))))
    assert sorted(loaded) == ["pooled", "prompt_embeds"]  # the FLUX adapter's conditioning columns
    embeds, pooled = torch.from_numpy(loaded["prompt_embeds"]), torch.from_numpy(loaded["pooled"])
    ref_all_embeds, ref_all_pooled = _reference(model, max_len, unique + new)  # one batch: batching must not matter
    ref_embeds, ref_pooled = ref_all_embeds[:len(unique)], ref_all_pooled[:len(unique)]
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
    meta = json.loads((out / META).read_text())
    assert meta["complete"] and meta["model.max_sequence_length"] == max_len
    assert meta["shapes"]["prompt_embeds"] == list(ref_embeds.shape[1:])
    assert meta["shapes"]["pooled"] == list(ref_pooled.shape[1:])
    import pyarrow.parquet as pq

    stored = pq.read_table([str(f) for f in part_files(out)],
                           columns=["caption", "clip_truncated", "t5_truncated"]).to_pylist()
    assert [r["caption"] for r in stored if r["clip_truncated"]] == [LONG]
    assert sum(r["t5_truncated"] for r in stored) == expected["truncated_t5"]

    # Ray Data reads the rows back in prompt_index order as numpy [L, d] / [d].
    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        rows = read_embedding_dataset(out).take_all()
    finally:
        ctx.execution_options.preserve_order = saved
    assert [r["prompt_index"] for r in rows] == list(range(len(unique)))
    assert [r["caption"] for r in rows] == unique
    assert rows[0]["prompt_embeds"].shape == tuple(ref_embeds.shape[1:]) and rows[0]["pooled"].shape == (
        ref_pooled.shape[1],)
    np.testing.assert_array_equal(np.stack([r["prompt_embeds"] for r in rows]), ref_embeds.numpy())

    # A rerun encodes nothing.
    again = preprocess(cfg, out, prompts=prompts, batch_size=2, num_actors=1, progress=False)
    assert (again.already_done, again.encoded, again.parts_written) == (len(unique), 0, 0)

    # A killed run: a part never renamed (its *.tmp left behind) and one half-written tmp file.
    lost = part_files(out)[1]
    n_lost, first_lost = pq.read_metadata(lost).num_rows, int(lost.name[len("part-"):-len(".parquet")])
    lost.rename(lost.with_name(lost.name + ".3f2a.tmp"))
    (out / "part-00000099.parquet.dead.tmp").write_bytes(b"PAR1 half a file")
    assert len(read_index(out)) == len(unique) - n_lost  # tmp files are never read
    with pytest.raises(ConfigError, match=rf"data\.prompt_embeddings.*missing prompt_index {first_lost}\b"):
        read_captions(out)  # positions would no longer be prompt_index
    with pytest.raises(KeyError, match=rf"prompt_index {first_lost} is not encoded"):
        load_embeddings(out, [0, first_lost])
    with prompts.open("a") as f:
        f.write("\n".join(APPENDED) + "\n")
    resumed = preprocess(cfg, out, prompts=prompts, batch_size=2, num_actors=1, progress=False)
    assert resumed.encoded == n_lost + len(new) and resumed.already_done == len(unique) - n_lost
    assert not list(out.glob("*.tmp"))
    assert read_captions(out) == unique + new  # the lost prompts kept their indices, new ones come next
    loaded = load_embeddings(out, list(range(len(unique) + len(new))))
    all_embeds, all_pooled = torch.from_numpy(loaded["prompt_embeds"]), torch.from_numpy(loaded["pooled"])
    torch.testing.assert_close(all_embeds, ref_all_embeds, rtol=0, atol=0)
    torch.testing.assert_close(all_pooled, ref_all_pooled, rtol=0, atol=0)

    # Another T5 length cannot be mixed into this folder, nor trained from it.
    other = tiny_cfg(f"model.max_sequence_length={max_len // 2}")
    with pytest.raises(ConfigError, match=r"data\.prompt_embeddings.*model\.max_sequence_length"):
        preprocess(other, out, prompts=prompts, progress=False)
    with pytest.raises(ConfigError, match=r"data\.prompt_embeddings.*model\.max_sequence_length"):
        check_compatible(out, other)
    # Nor another model (a copy elsewhere counts as another model: the folder records the resolved path).
    with pytest.raises(ConfigError, match=r"data\.prompt_embeddings.*was made with model\.path="):
        check_compatible(out, tiny_cfg(f"model.path={tmp_path / 'another-flux'}"))
    assert check_compatible(out, cfg)["complete"]


def test_training_from_the_parquet_takes_the_same_first_step_as_encoding_on_the_fly(tiny_cfg, ray_local, tmp_path,
                                                                                    monkeypatch):
    """The learner's first batch through the Ray Data stream, with and without data.prompt_embeddings,
    then the learner's SRPO step (colocated rollout and reward) on each: identical, bit for bit.
    With the parquet the stream has no text-encoder stage."""
    import ray.data

    import pipeline.ray.preprocess as ray_preprocess
    from pipeline.models import load_adapter
    from pipeline.objective import ColocatedReward
    from pipeline.rollout import sample_x0
    from pipeline.srpo_step import StepBatch, build_optimizer, grid_from_config, srpo_step
    from pipeline.ray.stream import build_dataset
    from pipeline.sources import draw_eps, global_batch
    from pipeline.objective import reward_model_from_config

    on_the_fly = tiny_cfg("rollout.placement=colocated", "train.max_steps=2")
    out = tmp_path / "emb"
    pools, encode_missing = [], ray_preprocess.encode_missing

    def recorded(cfg, out_dir, todo, batch_size, num_actors, progress):
        pools.append(num_actors)
        return encode_missing(cfg, out_dir, todo, batch_size, num_actors, progress)

    monkeypatch.setattr(ray_preprocess, "encode_missing", recorded)
    preprocess(on_the_fly, out, progress=False)
    assert pools == [2]  # no num_actors (`srpo preprocess` without --num-actors): tiny.yaml's rollout.num_actors
    from_parquet = tiny_cfg("rollout.placement=colocated", "train.max_steps=2", f"data.prompt_embeddings={out}")
    gb = global_batch(on_the_fly)
    batches, stages = [], []
    map_batches = ray.data.Dataset.map_batches
    monkeypatch.setattr(ray.data.Dataset, "map_batches",
                        lambda ds, fn, *a, **kw: stages[-1].append(fn.__name__) or map_batches(ds, fn, *a, **kw))
    for cfg in (on_the_fly, from_parquet):
        stages.append([])
        rows = build_dataset(cfg).take(gb)
        batches.append({k: np.stack([np.asarray(r[k]) for r in rows]) if k in ("prompt_embeds", "pooled")
                        else [r[k] for r in rows] for k in rows[0]})
    monkeypatch.undo()
    assert stages == [["TextEmbedStage"], ["EmbeddingLookupStage"]]
    a, b = batches
    assert a["caption"] == b["caption"] and a["noise_seed"] == b["noise_seed"]
    np.testing.assert_array_equal(a["prompt_embeds"], b["prompt_embeds"])
    np.testing.assert_array_equal(a["pooled"], b["pooled"])

    def first_step(cfg, batch):
        torch.manual_seed(0)
        adapter = load_adapter("flux", cfg.model.path, "cpu", cfg.model.max_sequence_length, load_text_encoders=False)
        cond = adapter.conditioning_from_arrays(batch, torch.device("cpu"))
        eps = draw_eps(adapter, [int(s) for s in batch["noise_seed"]], cfg.data.resolution)
        x0 = sample_x0(adapter, adapter.transformer, eps, cond, cfg.data.resolution, cfg.rollout.steps,
                       cfg.rollout.shift, cfg.rollout.guidance)
        o = cfg.optim
        opt = build_optimizer(adapter.transformer.parameters(), o.lr, o.betas, o.eps, o.weight_decay)
        objective = ColocatedReward(adapter, reward_model_from_config(cfg, "cpu"), cfg.data.resolution)
        m = srpo_step(adapter, adapter.transformer, opt, objective, grid_from_config(cfg.srpo, cfg.rollout.shift),
                      cfg.srpo, StepBatch(x0, eps, cond, list(batch["caption"])), 0,
                      torch.Generator().manual_seed(7), cfg.data.resolution, cfg.rollout.shift, max_grad_norm=o.max_grad_norm,
                      mixed_precision=cfg.train.mixed_precision)
        return m.flat(), adapter.transformer.state_dict()

    (ma, wa), (mb, wb) = first_step(on_the_fly, a), first_step(from_parquet, b)
    assert ma == mb
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_preprocess_preflight_names_the_model_folder_and_empty_prompts(tiny_world, tiny_overrides, tmp_path, capsys):
    """`srpo preprocess` checks the model layout and the prompts like every other command, before Ray starts."""
    import shutil

    from jobs.preprocess import main

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit, match="^2$"):
        main(["--config", str(REPO / "configs/tiny.yaml"), *tiny_overrides, "--prompts", str(empty)])
    err = capsys.readouterr().err
    assert err.startswith("config error: --prompts:") and len(err.strip().splitlines()) == 1
    broken = tmp_path / "flux"
    shutil.copytree(tiny_world["flux"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(SystemExit, match="^2$"):
        main(["--config", str(REPO / "configs/tiny.yaml"), *tiny_overrides, f"model.path={broken}"])
    err = capsys.readouterr().err
    assert err.startswith("config error: model.path:") and "vae" in err and len(err.strip().splitlines()) == 1


def test_a_folder_written_in_the_first_format_still_trains(tiny_cfg, tmp_path):
    """A FLUX folder as `srpo preprocess` wrote it before the columns came from the family (a fixed
    prompt_embeds + pooled schema, meta.json with clip_max_length), written here with pyarrow alone:
    it passes the compatibility check and the lookup stage gives its arrays back unchanged."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from pipeline.sources import EmbeddingLookupStage

    cfg = tiny_cfg()
    model = Path(cfg.model.path)
    d_t5 = json.loads((model / "text_encoder_2" / "config.json").read_text())["d_model"]
    d_clip = json.loads((model / "text_encoder" / "config.json").read_text())["hidden_size"]
    n, length = 3, cfg.model.max_sequence_length
    rng = np.random.default_rng(0)
    embeds = rng.normal(size=(n, length, d_t5)).astype(np.float32)
    pooled = rng.normal(size=(n, d_clip)).astype(np.float32)
    out = tmp_path / "old"
    out.mkdir()
    pq.write_table(pa.table({
        "prompt_index": pa.array(range(n), pa.int64()), "caption": pa.array(["a", "b", "c"]),
        "prompt_embeds": ArrowTensorArray.from_numpy(embeds), "pooled": ArrowTensorArray.from_numpy(pooled),
        "clip_truncated": pa.array([False] * n), "t5_truncated": pa.array([False] * n)}), out / "part-00000000.parquet")
    (out / META).write_text(json.dumps({
        "format_version": 1, "model.family": "flux", "model.path": str(model.resolve()),
        "model.max_sequence_length": length, "shapes": {"prompt_embeds": [length, d_t5], "pooled": [d_clip]},
        "dtype": "float32", "clip_max_length": 77, "complete": True,
        "counts": {"prompts": n, "parts": 1, "clip_truncated": 0, "t5_truncated": 0}}))
    assert check_compatible(out, cfg)["complete"] and read_captions(out) == ["a", "b", "c"]
    batch = EmbeddingLookupStage(str(out))({"prompt_index": np.array([2, 0]), "caption": np.array(["c", "a"])})
    np.testing.assert_array_equal(batch["prompt_embeds"], embeds[[2, 0]])
    np.testing.assert_array_equal(batch["pooled"], pooled[[2, 0]])
    assert batch["prompt_embeds"].dtype == batch["pooled"].dtype == np.float32
    # The model folder's text encoder now gives another width than the folder holds: refused, naming the field.
    meta = json.loads((out / META).read_text())
    meta["shapes"]["pooled"] = [d_clip + 1]
    (out / META).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"^data\.prompt_embeddings: .* holds the columns .*'pooled': \["):
        check_compatible(out, cfg)


def test_write_parts_refuses_a_column_of_another_shape_than_meta(tmp_path):
    from pipeline.ray.preprocess import write_parts

    batch = {"prompt_index": np.array([0]), "caption": np.array(["a"]), "clip_truncated": np.array([False]),
             "t5_truncated": np.array([False]), "prompt_embeds": np.zeros((1, 4, 3), np.float32)}
    with pytest.raises(RuntimeError, match=r"column 'prompt_embeds' of per-row shape \(4, 3\); meta\.json says \[5, 3\]"):
        write_parts(tmp_path, batch, {"prompt_embeds": [5, 3]})
    with pytest.raises(RuntimeError, match=r"column 'pooled' of per-row shape missing"):
        write_parts(tmp_path, batch, {"prompt_embeds": [4, 3], "pooled": [2]})
    assert not list(tmp_path.iterdir())
    assert write_parts(tmp_path, batch, {"prompt_embeds": [4, 3]}) == ["part-00000000.parquet"]
