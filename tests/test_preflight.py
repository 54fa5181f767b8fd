"""Pre-flight (issue 9, part 4): the driver's checks of the model folder, the reward checkpoints and the
data, before any model loads or any Ray worker starts. Each failure is one line naming the field."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from jobs import evaluate, sample, train
from pipeline.config import ConfigError, absolute_paths
from pipeline.preflight import preflight
from rewards.base import RewardCheckpointError, describe_load_error
from rewards.hf_clip import HFCLIPReward
from rewards.hps import HPSv2Reward

REPO = Path(__file__).resolve().parents[1]
# torch's advice ("... `weights_only` set to `False` ..."), never shown for a reward checkpoint
TORCH_ADVICE_TEXT = re.compile(r"weights_only.{0,20}False", re.IGNORECASE)


class _OpensAFile:
    """A pickle payload that creates a file when unpickled by a loader that runs code (io.open)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_checkpoint(tiny_world, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny HPS checkpoint plus a payload: (file, the marker the payload would create)."""
    marker = tmp_path / "payload-ran"
    sd = torch.load(tiny_world["hps_checkpoint"], weights_only=True)["state_dict"]
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": sd, "payload": _OpensAFile(str(marker))}, path)
    return path, marker


def garbage(tmp_path: Path, name: str = "garbage.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(b"this is not a torch checkpoint " * 8)
    return path


def fails(cfg, pattern: str, scorers: bool = False) -> str:
    """The pre-flight error of ``cfg`` (paths made absolute as the driver does): one line matching ``pattern``."""
    with pytest.raises(ConfigError, match=pattern) as info:
        preflight(absolute_paths(cfg), scorers=scorers)
    text = str(info.value)
    assert "\n" not in text and not TORCH_ADVICE_TEXT.search(text), text
    return text


# ------------------------------------------------------------------------------------------ the tiny world passes


def test_the_tiny_world_passes_every_check(tiny_cfg, tiny_world):
    w = tiny_world
    cfg = absolute_paths(tiny_cfg(f"eval.gold=[{{kind: clip, path: {w['clip']}}}]", "eval.every=2"))
    preflight(cfg)
    preflight(cfg, scorers=True)


# ------------------------------------------------------------------------------------------ reward checkpoints


def test_a_pickle_with_a_foreign_global_is_refused_without_running_it(tiny_cfg, tiny_world, tmp_path):
    evil, marker = evil_checkpoint(tiny_world, tmp_path)
    text = fails(tiny_cfg(f"reward.path={evil}"),
                 rf"^reward\.path: cannot load {re.escape(str(evil))} with torch\.load\(weights_only=True\): "
                 r"it holds a pickled Python object \(io\.open\) besides tensors")
    assert "HPS_v2.1_compressed.pt" in text  # what was expected
    assert not marker.exists(), "weights_only=True: the payload never ran"


def test_a_garbage_file_and_a_wrong_state_dict_are_named(tiny_cfg, tiny_world, tmp_path):
    bad = garbage(tmp_path)
    fails(tiny_cfg(f"reward.path={bad}"),
          rf"^reward\.path: cannot load {re.escape(str(bad))} with torch\.load\(weights_only=True\): ")
    sd = torch.load(tiny_world["hps_checkpoint"], weights_only=True)["state_dict"]
    missing = tmp_path / "missing_key.pt"
    torch.save({"state_dict": {k: v for k, v in sd.items() if k != "visual.proj"}}, missing)
    fails(tiny_cfg(f"reward.path={missing}"),
          r"^reward\.path: .*missing_key\.pt does not match the open_clip architecture .*"
          r"missing keys \['visual\.proj'\]")
    reshaped = tmp_path / "reshaped.pt"
    torch.save({"state_dict": {**sd, "logit_scale": torch.zeros(3)}}, reshaped)
    fails(tiny_cfg(f"reward.path={reshaped}"), r"^reward\.path: .*shapes that differ \['logit_scale \(3,\) vs \(\)'\]")
    fails(tiny_cfg("reward.arch=ViT-Q-99"), r"^reward\.arch: unknown open_clip architecture 'ViT-Q-99'")


def test_a_legacy_non_zip_checkpoint_is_still_accepted(tiny_cfg, tiny_world, tmp_path):
    """The pre-flight maps zip checkpoints; a file of torch's older format cannot be mapped and is read."""
    sd = torch.load(tiny_world["hps_checkpoint"], weights_only=True)["state_dict"]
    legacy = tmp_path / "legacy.pt"
    torch.save({"state_dict": sd}, legacy, _use_new_zipfile_serialization=False)
    preflight(absolute_paths(tiny_cfg(f"reward.path={legacy}")))


def test_clip_folders_are_checked_from_their_keys(tiny_cfg, tiny_world, tmp_path):
    pick = tmp_path / "PickScore_v1"
    shutil.copytree(tiny_world["pickscore"], pick)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (pick / f).unlink()  # as the released PickScore_v1 folder: no tokenizer
    base = ["reward.kind=pickscore"]
    fails(tiny_cfg(*base, f"reward.path={pick}"),
          rf"^reward\.path: {re.escape(str(pick))}: no tokenizer files; expected a CLIP tokenizer folder .*"
          r"\(PickScore_v1 ships no tokenizer: set reward\.tokenizer_path to the CLIP-ViT-H-14 processor folder\)$")
    preflight(absolute_paths(tiny_cfg(*base, f"reward.path={pick}", f"reward.tokenizer_path={tiny_world['clip']}")))

    weights = (pick / "model.safetensors").read_bytes()
    (pick / "model.safetensors").write_bytes(weights[:-100])  # an interrupted download
    fails(tiny_cfg(*base, f"reward.path={pick}", f"reward.tokenizer_path={tiny_world['clip']}"),
          r"^reward\.path: .*model\.safetensors: not a complete safetensors file")

    text_only = tmp_path / "text_only"
    shutil.copytree(tiny_world["clip"], text_only)
    sd = load_file(str(text_only / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("vision_model.")}, str(text_only / "model.safetensors"))
    fails(tiny_cfg("reward.kind=clip", f"reward.path={text_only}"),
          r"^reward\.path: .*text_only: its weights have no vision_model\.\* parameters")


def test_a_pickled_bin_in_a_clip_folder_is_refused(tiny_cfg, tiny_world, tmp_path):
    folder = tmp_path / "clip_bin"
    shutil.copytree(tiny_world["clip"], folder)
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**sd, "payload": _OpensAFile(str(marker))}, folder / "pytorch_model.bin")
    fails(tiny_cfg("reward.kind=clip", f"reward.path={folder}"),
          r"^reward\.path: cannot load .*pytorch_model\.bin with torch\.load\(weights_only=True\): it holds a pickled "
          r"Python object \(io\.open\)")
    assert not marker.exists()


def test_evaluation_and_gold_scorers_are_checked_where_used(tiny_cfg, tiny_world, tmp_path):
    bad = garbage(tmp_path, "sac+logos+ava1-l14-linearMSE.pth")
    scorer = f"[{{kind: aesthetic, path: {bad}, clip_path: {tiny_world['clip']}}}]"
    cfg = tiny_cfg(f"eval.scorers={scorer}")
    preflight(absolute_paths(cfg))  # training does not load eval.scorers
    fails(cfg, r"^eval\.scorers\[0\]\.path: cannot load .*linearMSE\.pth with torch\.load\(weights_only=True\): "
               r".*\(expected the LAION aesthetic predictor", scorers=True)
    fails(tiny_cfg(f"eval.scorers=[{{kind: aesthetic, path: {tiny_world['aesthetic']}, clip_path: {bad}}}]"),
          r"^eval\.scorers\[0\]\.clip_path: ", scorers=True)
    fails(tiny_cfg(f"eval.gold={scorer}", "eval.every=2"), r"^eval\.gold\[0\]\.path: cannot load ")
    # evaluate with scorers of its own does not load the training reward
    good = f"[{{kind: aesthetic, path: {tiny_world['aesthetic']}, clip_path: {tiny_world['clip']}}}]"
    preflight(absolute_paths(tiny_cfg(f"eval.scorers={good}", f"reward.path={bad}")), scorers=True)


# ------------------------------------------------------------------------------------------ run-time loaders


def test_run_time_loaders_never_pass_on_torchs_advice(tiny_world, tmp_path):
    """The reward loaders (reward actors, learners, scorers) word a refused pickle themselves, and drop
    torch's exception (its text advises weights_only=False) from the chain a traceback would print."""
    evil, marker = evil_checkpoint(tiny_world, tmp_path)
    with pytest.raises(RewardCheckpointError, match=r"pickled Python object \(io\.open\)") as info:
        HPSv2Reward.load(evil, arch=tiny_world["hps_arch"])
    assert not TORCH_ADVICE_TEXT.search(str(info.value))
    assert info.value.__cause__ is None and info.value.__suppress_context__
    folder = tmp_path / "clip_bin"
    shutil.copytree(tiny_world["clip"], folder)
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**sd, "payload": _OpensAFile(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(RewardCheckpointError, match=r"^cannot load a CLIPModel from .*clip_bin: ") as info:
        HFCLIPReward.load(folder, kind="clip")
    assert not TORCH_ADVICE_TEXT.search(str(info.value)) and info.value.__cause__ is None
    assert not marker.exists()


def test_describe_load_error_finds_a_wrapped_refusal():
    refusal = pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to "
                                     "`False` will likely succeed\nUnsupported global: GLOBAL posix.system was not")
    try:
        try:
            raise refusal
        except pickle.UnpicklingError as e:
            raise OSError("Unable to load weights from pytorch checkpoint file") from e
    except OSError as wrapped:
        text = describe_load_error(wrapped)
    assert text.startswith("it holds a pickled Python object (posix.system)") and "False" not in text
    assert describe_load_error(KeyError("101")) == "KeyError: '101'"


# ------------------------------------------------------------------------------------------ the model folder


@pytest.fixture()
def model_copy(tiny_world, tmp_path) -> Path:
    out = tmp_path / "flux"
    shutil.copytree(tiny_world["flux"], out)
    return out


def test_a_missing_component_folder_is_named(tiny_cfg, model_copy):
    shutil.rmtree(model_copy / "text_encoder_2")
    fails(tiny_cfg(f"model.path={model_copy}"),
          rf"^model\.path: {re.escape(str(model_copy / 'text_encoder_2'))} is missing; expected the component "
          r"folder 'text_encoder_2'")


@pytest.mark.parametrize("damage, pattern", [
    ("no_tokenizer_vocab", r"tokenizer_2 has none of tokenizer\.json, vocab\.json, spiece\.model"),
    ("no_vae_config", r"vae/config\.json is missing; expected the config of component 'vae'"),
    ("truncated_weights", r"transformer/diffusion_pytorch_model\.safetensors is not a complete safetensors file"),
    ("missing_shard", r"transformer/diffusion_pytorch_model-00002-of-00002\.safetensors is missing but "
                      r"diffusion_pytorch_model\.safetensors\.index\.json names it"),
    ("unlisted", r"model_index\.json does not list component 'scheduler'"),
    ("other_family", r"transformer/config\.json has _class_name 'SD3Transformer2DModel'; expected "
                     r"'FluxTransformer2DModel'"),
])
def test_a_damaged_model_folder_is_named(tiny_cfg, model_copy, damage, pattern):
    t = model_copy / "transformer"
    if damage == "no_tokenizer_vocab":
        (model_copy / "tokenizer_2" / "tokenizer.json").unlink()
    elif damage == "no_vae_config":
        (model_copy / "vae" / "config.json").unlink()
    elif damage == "truncated_weights":
        data = (t / "diffusion_pytorch_model.safetensors").read_bytes()
        (t / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing_shard":  # FLUX.1-dev's transformer is sharded: an index and its shards
        sd = load_file(str(t / "diffusion_pytorch_model.safetensors"))
        (t / "diffusion_pytorch_model.safetensors").unlink()
        keys = sorted(sd)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        save_file({k: sd[k] for k in shards["diffusion_pytorch_model-00001-of-00002.safetensors"]},
                  str(t / "diffusion_pytorch_model-00001-of-00002.safetensors"))
        (t / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    elif damage == "unlisted":
        index = json.loads((model_copy / "model_index.json").read_text())
        del index["scheduler"]
        (model_copy / "model_index.json").write_text(json.dumps(index))
    else:
        config = json.loads((t / "config.json").read_text())
        (t / "config.json").write_text(json.dumps({**config, "_class_name": "SD3Transformer2DModel"}))
    fails(tiny_cfg(f"model.path={model_copy}"), rf"^model\.path: .*{pattern}")


def test_a_complete_sharded_transformer_passes(tiny_cfg, model_copy):
    t = model_copy / "transformer"
    sd = load_file(str(t / "diffusion_pytorch_model.safetensors"))
    (t / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(sd)
    halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(t / name))
    (t / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in halves.items() for k in ks}}))
    preflight(absolute_paths(tiny_cfg(f"model.path={model_copy}")))


# ------------------------------------------------------------------------------------------ prompts and images


@pytest.mark.parametrize("content", ["", "\n   \n\t\n"], ids=["empty", "blank-lines"])
def test_an_empty_prompt_set_is_named(tiny_cfg, tmp_path, content):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    fails(tiny_cfg(f"data.prompts={prompts}"), rf"^data\.prompts: {re.escape(str(prompts))}: no non-empty prompt")
    # held-out prompts: read by gold evaluation (eval.every > 0) and by `srpo evaluate`
    preflight(absolute_paths(tiny_cfg(f"data.heldout_prompts={prompts}")))
    fails(tiny_cfg(f"data.heldout_prompts={prompts}"), r"^data\.heldout_prompts: .*no non-empty prompt", scorers=True)
    fails(tiny_cfg(f"eval.prompts={prompts}"), r"^eval\.prompts: .*no non-empty prompt", scorers=True)


def _image(path: Path, caption: str | None, size: int = 64) -> None:
    Image.new("RGB", (size, size), (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_an_image_set_without_a_usable_image_is_named(tiny_cfg, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    offline = ("rollout.mode=offline", f"data.images={folder}")
    fails(tiny_cfg(*offline), rf"^data\.images: no usable image in {re.escape(str(folder))} \(0 listed, 0 skipped: "
                              r"\{\}\); expected images of at least 64 px")
    _image(folder / "a.png", None)  # no caption
    _image(folder / "b.png", "   ")  # blank caption
    _image(folder / "c.png", "a small red square", size=32)  # below data.resolution
    (folder / "d.png").write_bytes(b"not a png")
    (folder / "d.txt").write_text("a broken file")
    fails(tiny_cfg(*offline), r"^data\.images: no usable image in .* \(2 listed, 4 skipped: "
                              r"\{'missing_caption': 1, 'empty_caption': 1, 'too_small': 1, 'unreadable': 1\}\)")
    _image(folder / "e.png", "a red square")  # one usable image is enough
    preflight(absolute_paths(tiny_cfg(*offline)))


# ------------------------------------------------------------------------------------------ the commands


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`srpo train` as a user runs it. RAY_ADDRESS points at nothing: a job that got as far as ray.init
    would fail there with Ray's own error, not with the one pre-flight line asserted below."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/tiny.yaml", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("workers, payload", [("2", "pickle"), ("2", "garbage"), ("0", "pickle")],
                         ids=["ray-pickle", "ray-garbage", "single-process-pickle"])
def test_train_refuses_a_bad_reward_checkpoint_in_one_line(tiny_world, tiny_overrides, tmp_path, workers, payload):
    evil, marker = evil_checkpoint(tiny_world, tmp_path)
    bad, what = (evil, "it holds a pickled Python object (io.open)") if payload == "pickle" else (garbage(tmp_path), "")
    proc = _cli(*tiny_overrides, f"reward.path={bad}", f"learner.num_workers={workers}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"config error: reward.path: cannot load {bad} with torch.load(weights_only=True): "
                               f"{what}")
    assert proc.stdout == "", "nothing ran before the check (no Ray, no model)"
    assert "Traceback" not in proc.stderr and not TORCH_ADVICE_TEXT.search(proc.stderr)
    assert not marker.exists()


def _main_fails(main, argv: list[str], capsys) -> str:
    """A job's main() in this process: exit status 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit, match="^2$"):
        main(argv)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def test_every_command_checks_before_loading(tiny_world, tiny_overrides, tmp_path, capsys):
    """train (empty prompts, an empty image folder), evaluate (a bad scorer), sample (a model folder
    without a component): one line each, exit status 2, from the same pre-flight."""
    base = ["--config", "configs/tiny.yaml", *tiny_overrides]
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n\n")
    assert _main_fails(train.main, [*base, f"data.prompts={prompts}", "learner.num_workers=0"], capsys) == (
        f"config error: data.prompts: {prompts}: no non-empty prompt; expected at least one caption")
    (tmp_path / "images").mkdir()
    assert _main_fails(train.main, [*base, "rollout.mode=offline", f"data.images={tmp_path / 'images'}"], capsys
                       ).startswith(f"config error: data.images: no usable image in {tmp_path / 'images'} (0 listed")
    bad = garbage(tmp_path, "mlp.pth")
    assert _main_fails(evaluate.main, [*base, f"eval.scorers=[{{kind: aesthetic, path: {bad}, clip_path: "
                                              f"{tiny_world['clip']}}}]"], capsys).startswith(
        f"config error: eval.scorers[0].path: cannot load {bad} with torch.load(weights_only=True)")
    model = tmp_path / "flux"
    shutil.copytree(tiny_world["flux"], model)
    shutil.rmtree(model / "vae")
    assert _main_fails(sample.main, [*base, f"model.path={model}", "--prompts", "a cat", "--out", str(tmp_path / "o")],
                       capsys).startswith(f"config error: model.path: {model / 'vae'} is missing; expected the "
                                          "component folder 'vae'")
