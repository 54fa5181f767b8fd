"""Learner engines: data parallelism applied from outside the model (DESIGN principle 5).

    engine = build_engine(strategy, transformer, optim_cfg, device, mixed_precision, activation_checkpointing)
    srpo_backward(adapter, engine.transformer, ..., backward=engine.backward)   # one backward per branch
    grad_norm = engine.step(max_grad_norm)    # global-norm clip across shards, AdamW, zero grads
    state = engine.full_state_dict()          # plain diffusers keys, fp32, CPU (publish / safetensors)

Strategies:
- ``single``: the plain module and AdamW of :mod:`pipeline.srpo_step`, exactly what ``SRPOTrainer`` runs.
- ``fsdp2``: ``fully_shard`` on every block of the family's ``shard_blocks`` (FLUX: each double-stream,
  then each single-stream block; Qwen-Image: each transformer block), then the root (torchtitan's
  FLUX ``parallelize``); AdamW is built after sharding, on the DTensor shards.
- ``deepspeed``: ZeRO stage 2 or 3 around the same ``torch.optim.AdamW``.

With LoRA (pipeline/lora.py) the transformer arrives with peft's adapters and a frozen base: every
engine gives AdamW the trainable parameters alone, keeps the frozen ones in bf16 on accelerators,
leaves them out of checkpoints (the base is reloaded from model.path), and merges the adapters into
the plain diffusers keys in ``full_state_dict``. Full fine-tuning has no frozen parameter, and none of
this changes anything for it.

The sharded strategies are data parallel: each rank runs its own samples and the gradients are
averaged across ranks (FSDP2's reduce-scatter and DeepSpeed's reduction both divide by the world
size). Since the SRPO branch loss is a per-sample mean, N ranks with B samples each compute the
update a single process computes for the N*B batch. They need an initialised default process
group (a Ray Train worker, or a test's spawned processes; backend from
:func:`pipeline.device.distributed_backend`).
"""
from __future__ import annotations

import importlib
import io
import os
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from pipeline.config import OptimConfig
from pipeline.lora import cast_frozen, is_lora, merge_lora, peft_scaling
from pipeline.srpo_step import build_optimizer, optimizer_step

STRATEGIES = ("single", "fsdp2", "deepspeed")
ZERO_STAGES = (2, 3)


@runtime_checkable
class LearnerEngine(Protocol):
    """One learner's model + optimizer, however it is distributed.

    - ``backward(loss)``: one call per SRPO branch; gradients accumulate until ``step``.
    - ``step(max_grad_norm)``: clip the global gradient norm (across shards), AdamW, zero the
      gradients; returns the pre-clip norm as a float, the same on every rank.
    - ``full_state_dict()``: a collective on the sharded engines (every rank calls it, in step). The
      consolidated fp32 CPU state with the plain diffusers keys is returned on rank 0 (on every rank
      with ``rank0_only=False``); the other ranks get ``{}``, which bounds host memory at one copy.
      A LoRA model's state comes merged (``W + (B @ A) * scaling``), with the plain keys.
    - ``trainable_state_dict()``: as ``full_state_dict`` for the trainable parameters alone, with the
      module's own keys (a LoRA run: the adapters, what the weight sync moves).
    - ``load_full_state_dict(state)``: every rank passes the same full state (the module's own keys);
      weights only (AdamW's state is untouched).
    - ``gathered_for_inference()``: a context for no-grad forwards (the colocated rollout) in which
      a sharded model gathers its parameters once instead of once per forward.
    - ``step_scope(backwards)``: the context of one SRPO step's forwards and its ``backwards``
      backward calls; FSDP2 with ``keep_gathered`` gathers once and reduce-scatters once in it.
    """

    name: str  # the strategy, as recorded in checkpoints
    transformer: nn.Module  # what adapter.velocity(...) calls for the forward
    module: nn.Module  # the plain diffusers module under any wrapper (peft's state-dict helpers read it)
    optimizer: torch.optim.Optimizer | None

    def gathered_for_inference(self) -> AbstractContextManager: ...

    def step_scope(self, backwards: int) -> AbstractContextManager: ...

    def backward(self, loss: Tensor) -> None: ...

    def step(self, max_grad_norm: float) -> float: ...

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]: ...

    def trainable_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]: ...

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def save_sharded(self, path: str) -> None: ...  # collective: model + optimizer shards of this rank

    def load_sharded(self, path: str) -> None: ...  # collective: the inverse of save_sharded


def build_engine(strategy: str, transformer: nn.Module, optim_cfg: OptimConfig, device: torch.device,
                 mixed_precision: str, activation_checkpointing: bool, zero_stage: int,
                 shard_blocks: list[nn.Module] | None = None, keep_gathered: bool = False) -> LearnerEngine:
    """Wrap ``transformer`` (a plain diffusers model, fp32 weights) for training on ``device``.

    ``mixed_precision`` "bf16" means bf16 compute over fp32 master weights: for ``single`` the
    autocast in ``srpo_backward`` does it; ``fsdp2`` adds MixedPrecisionPolicy(bf16, reduce fp32)
    and ``deepspeed`` its bf16 mode, on accelerators only (on the CPU both stay fp32).
    """
    device = torch.device(device)
    if strategy == "single":
        return SingleEngine(transformer, optim_cfg, device, activation_checkpointing, mixed_precision)
    if strategy == "fsdp2":
        return FSDP2Engine(transformer, optim_cfg, device, mixed_precision, activation_checkpointing,
                           shard_blocks or [], keep_gathered)
    if strategy == "deepspeed":
        return DeepSpeedZeroEngine(transformer, optim_cfg, device, mixed_precision, activation_checkpointing,
                                   zero_stage)
    raise ValueError(f"learner.strategy: got {strategy!r}, expected one of {list(STRATEGIES)}")


# ------------------------------------------------------------------------------------------ helpers


def _bf16_compute(device: torch.device, mixed_precision: str) -> bool:
    """bf16 parameters for compute only on accelerators: bf16 matmuls on the CPU are slow and the
    CPU runs exist to check numerics against the fp32 single-process trainer."""
    return mixed_precision == "bf16" and device.type != "cpu"


def _require_process_group(strategy: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"learner.strategy={strategy!r} needs an initialised torch.distributed process group "
            "(a Ray Train worker provides one; otherwise call torch.distributed.init_process_group with "
            "pipeline.device.distributed_backend(device))")


def _enable_activation_checkpointing(transformer: nn.Module) -> None:
    """diffusers' own per-block checkpointing (non-reentrant ``torch.utils.checkpoint`` around each
    block's ``__call__``); see FSDP2Engine for why this rather than ``checkpoint_wrapper``."""
    if not hasattr(transformer, "enable_gradient_checkpointing"):
        raise TypeError(f"{type(transformer).__name__} has no enable_gradient_checkpointing(); "
                        "activation checkpointing needs a diffusers model")
    transformer.enable_gradient_checkpointing()


def _set_current_device(device: torch.device) -> None:
    """Collectives (FSDP2's device mesh, DeepSpeed) use the current accelerator; make it ``device``."""
    if device.type != "cpu" and device.index is not None:
        torch.accelerator.set_device_index(device.index)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    """What AdamW updates: every parameter for full fine-tuning, the adapters of a LoRA model."""
    return [p for p in module.parameters() if p.requires_grad]


def _store_frozen(module: nn.Module, device: torch.device, mixed_precision: str) -> None:
    """A LoRA run's frozen base in bf16 on accelerators (no fp32 master copy is needed for weights
    that never update); fp32 on the CPU. Full fine-tuning has no frozen parameter: nothing changes."""
    if _bf16_compute(device, mixed_precision):
        cast_frozen(module, torch.bfloat16)


def _merged(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The consolidated state of ``module`` as exports read it: a LoRA model's adapters merged into
    plain diffusers keys (pipeline/lora.py); anything else unchanged."""
    return merge_lora(state, peft_scaling(module)) if state and is_lora(module) else state


def _to_cpu_fp32(t: Tensor) -> Tensor:
    dtype = torch.float32 if t.is_floating_point() else t.dtype
    # copy=True: never hand out a view of live training storage (the next step would change it).
    return t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def _check_keys(state: dict[str, Tensor], expected: list[str]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"load_full_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
                       f"({len(missing)} missing, {len(unexpected)} unexpected); expected the plain "
                       "diffusers transformer state dict")


# Frozen parameters (a LoRA run's base) are not checkpointed: they are the base model's, reloaded at
# start; the model entries are then the adapters alone. Full fine-tuning has none: the same entries.
_DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    model_state, optim_state = get_state_dict(model, optimizer, options=_DCP_OPTIONS)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles a checkpoint's non-tensor entries (AdamW's steps and param
    groups: numbers, lists, dicts) with ``weights_only=False``; this one reads them with ``True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Inverse of :func:`_save_dcp`: every rank reads its own shards (DCP reshards if the layout
    differs) and loads them in place, model and AdamW state both."""
    model_state, optim_state = get_state_dict(model, optimizer, options=_DCP_OPTIONS)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, planner=_WeightsOnlyLoadPlanner())
    # strict=False: load_state_dict would miss the frozen parameters, which are not in the checkpoint;
    # anything else missing is still an error.
    keys = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                          options=StateDictOptions(ignore_frozen_params=True, strict=False))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = sorted(set(keys.missing_keys) - frozen)
    if missing or keys.unexpected_keys:
        raise KeyError(f"{path}: model entries missing {missing[:5]}, unexpected {sorted(keys.unexpected_keys)[:5]}")


def read_dcp_model_weights(dcp_dir: Path, expected: dict[str, tuple[int, ...]] | None) -> dict[str, torch.Tensor]:
    """Only the ``model`` entries of a DCP checkpoint into fp32 CPU tensors (the optimizer is skipped).

    Keys and shapes are checked against ``expected`` (the base transformer's parameter template) when
    it is known, else taken from the checkpoint's metadata. Shards written by any number of ranks (FSDP2's DTensors) are
    stitched by DCP itself; ``no_dist`` keeps it to this process.
    """
    try:
        metadata = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - DCP raises several types for a bad folder
        raise ValueError(f"{dcp_dir}: unreadable torch.distributed.checkpoint metadata ({e})") from e
    saved = {k.removeprefix("model."): m for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
    bad = sorted(k for k, m in saved.items() if not isinstance(m, TensorStorageMetadata))
    if not saved or bad:
        raise ValueError(f"{dcp_dir}: {'non-tensor model entries ' + str(bad[:5]) if bad else 'no model entries'}; "
                         "expected {'model': transformer state dict, 'optim': ...}")
    shapes = {k: tuple(m.size) for k, m in saved.items()}
    if expected is not None:
        if shapes != expected:
            missing = sorted(set(expected) - set(shapes))
            unexpected = sorted(set(shapes) - set(expected))
            wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
            raise KeyError(f"{dcp_dir}: model entries do not match the base transformer: missing "
                           f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    state = {k: torch.empty(shape, dtype=torch.float32) if saved[k].properties.dtype.is_floating_point
             else torch.empty(shape, dtype=saved[k].properties.dtype) for k, shape in shapes.items()}
    dcp.load({"model": state}, checkpoint_id=str(dcp_dir), no_dist=True, planner=_WeightsOnlyLoadPlanner())
    return state


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class _DCPCheckpoints:
    """save_sharded / load_sharded with torch.distributed.checkpoint, for engines whose module and
    optimizer DCP understands directly (the plain module, FSDP2's DTensor shards)."""

    transformer: nn.Module
    optimizer: torch.optim.Optimizer

    def save_sharded(self, path: str) -> None:
        """Collective: this rank's model and AdamW shards with torch.distributed.checkpoint (DCP).

        Each rank writes its own files into ``path`` (rank 0 also the metadata); the per-rank
        folders of one step together form one DCP checkpoint, which is how Ray Train's report
        merges them.
        """
        _save_dcp(self.transformer, self.optimizer, path)

    def load_sharded(self, path: str) -> None:
        _load_dcp(self.transformer, self.optimizer, path)


# ------------------------------------------------------------------------------------------ single


class SingleEngine(_DCPCheckpoints):
    """No distribution: the module itself, AdamW, ``loss.backward()``."""

    name = "single"

    def gathered_for_inference(self) -> AbstractContextManager:
        return nullcontext()

    def step_scope(self, backwards: int) -> AbstractContextManager:
        return nullcontext()

    def __init__(self, transformer: nn.Module, optim_cfg: OptimConfig, device: torch.device,
                 activation_checkpointing: bool, mixed_precision: str = "fp32") -> None:
        self.transformer = self.module = transformer.to(device).train()
        _store_frozen(self.transformer, device, mixed_precision)
        if activation_checkpointing:
            _enable_activation_checkpointing(self.transformer)
        o = optim_cfg
        self.optimizer = build_optimizer(_trainable(self.transformer), o.lr, o.betas, o.eps, o.weight_decay)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, max_grad_norm: float) -> float:
        return optimizer_step(self.transformer, self.optimizer, max_grad_norm)

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]:
        """The whole state on the calling process (there is only one)."""
        return _merged(self.module, {k: _to_cpu_fp32(v) for k, v in self.transformer.state_dict().items()})

    def trainable_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]:
        return {k: _to_cpu_fp32(p) for k, p in self.transformer.named_parameters() if p.requires_grad}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        _check_keys(state, list(self.transformer.state_dict()))
        # In place (assign=False): the optimizer keeps pointing at the same parameters.
        self.transformer.load_state_dict(state)


# ------------------------------------------------------------------------------------------ FSDP2


class FSDP2Engine(_DCPCheckpoints):
    """``fully_shard`` per block of the family's ``shard_blocks``, then the root; AdamW on the DTensor shards.

    Activation checkpointing uses diffusers' own (``enable_gradient_checkpointing``) rather than
    torchtitan's ``checkpoint_wrapper``: the wrapper replaces each block by a ``CheckpointWrapper``
    and renames every parameter (``..._checkpoint_wrapped_module...``), so optimizer and state-dict
    keys would no longer be the plain diffusers ones; diffusers' version keeps the module tree, is
    what the single-process trainer uses, and is non-reentrant ``torch.utils.checkpoint`` around
    ``block.__call__``, which FSDP2 supports: during the recomputation its pre-forward hook sees the
    block already unsharded by the pre-backward hook and does not all-gather again.

    Mixed precision (accelerators): parameters are all-gathered in bf16, gradients reduce-scattered
    in fp32, the sharded master weights and AdamW state stay fp32.
    """

    name = "fsdp2"

    def __init__(self, transformer: nn.Module, optim_cfg: OptimConfig, device: torch.device,
                 mixed_precision: str, activation_checkpointing: bool, blocks: list[nn.Module],
                 keep_gathered: bool = False) -> None:

        _require_process_group("fsdp2")
        _set_current_device(device)
        transformer = transformer.to(device).train()
        _store_frozen(transformer, device, mixed_precision)  # before sharding: the shards keep the dtype
        if activation_checkpointing:
            _enable_activation_checkpointing(transformer)  # before sharding; it only sets flags
        # Explicit mesh device type: the default would pick the machine's accelerator even for a
        # CPU learner (CPU tests on a GPU host).
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        if _bf16_compute(device, mixed_precision):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        if not blocks:
            raise TypeError(f"{type(transformer).__name__}: the model adapter named no blocks to shard")
        # Blocks may return slices of one tensor (views), and the root a reshaped Linear output;
        # FSDP2 warns that an in-place op on such a view would bypass its pre-backward hook. Neither
        # diffusers' forward nor Direct-Align modifies them in place.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*\) returned a view tensor")
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        # Root last: it owns what no block does (embedders, norm_out, proj_out).
        fully_shard(transformer, mesh=mesh, mp_policy=mp)
        self.transformer = self.module = transformer
        self._fsdp_modules = [m for m in transformer.modules() if isinstance(m, FSDPModule)]
        self.keep_gathered, self._backwards_left = keep_gathered, 0
        o = optim_cfg
        # After sharding, so AdamW's state is allocated per shard (DTensor) and never whole.
        self.optimizer = build_optimizer(_trainable(transformer), o.lr, o.betas, o.eps, o.weight_decay)

    def backward(self, loss: Tensor) -> None:
        if self._backwards_left == 1:  # the step's last backward reduce-scatters the summed gradients
            for module in self._fsdp_modules:
                module.set_requires_gradient_sync(True, recurse=False)
        self._backwards_left = max(self._backwards_left - 1, 0)
        loss.backward()  # FSDP2's hooks reduce-scatter (average) each block's gradients

    @contextmanager
    def step_scope(self, backwards: int) -> Iterator[None]:
        """``learner.fsdp_keep_gathered``: every block stays gathered from the step's first forward to
        its last backward (one all-gather per step instead of one per forward and per backward), and
        the branches' gradients accumulate unsharded and are reduce-scattered once, in the last
        backward (FSDP2's no-sync accumulation). The price is a whole model and a whole gradient per
        rank during the step, as DDP: for small models or interconnects where collectives dominate.
        A colocated rollout just before the step leaves the blocks gathered (see
        :meth:`gathered_for_inference`), so the step's forwards reuse them: one all-gather per step
        for rollout and update together. Everything is resharded before ``step`` clips the sharded
        gradients."""
        if not self.keep_gathered or backwards < 2:
            try:
                yield
            finally:
                self._reshard_all()  # blocks a rollout left gathered: FSDP2's per-forward gathers from here
            return
        for module in self._fsdp_modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.set_reshard_after_backward(False, recurse=False)
            module.set_requires_gradient_sync(False, recurse=False)
        self._backwards_left = backwards
        try:
            yield
        finally:
            self._backwards_left = 0
            self._reshard_all()
            for module in self._fsdp_modules:
                module.set_requires_gradient_sync(True, recurse=False)
                module.set_reshard_after_backward(True, recurse=False)

    @contextmanager
    def gathered_for_inference(self) -> Iterator[None]:
        """All-gather every block once and keep it whole for the context (the colocated rollout's
        denoising steps). Without it FSDP2 re-gathers every block in every one of the rollout's
        forwards: rollout.steps x the model's bytes per rank. With ``keep_gathered`` the blocks stay
        gathered after a clean exit, for the SRPO step that follows (its ``step_scope`` reshards,
        and ``step`` never updates weights while gathered copies exist); otherwise they are freed."""
        for module in self._fsdp_modules:
            module.set_reshard_after_forward(False, recurse=False)
        try:
            for module in self._fsdp_modules:
                module.unshard()
            yield
        except BaseException:
            self._reshard_all()
            raise
        if not self.keep_gathered:
            self._reshard_all()

    def _reshard_all(self) -> None:
        """Free every gathered block (a no-op for sharded ones) and restore FSDP2's defaults."""
        for module in self._fsdp_modules:
            module.reshard()
            if module is not self.transformer:  # the root keeps FSDP2's default (no reshard after forward)
                module.set_reshard_after_forward(True, recurse=False)

    def step(self, max_grad_norm: float) -> float:
        """``clip_grad_norm_`` on DTensor gradients computes the norm of the whole gradient (the
        shard norms are combined by an all-reduce); ``full_tensor()`` makes it a plain float, the
        same on every rank because every rank receives the one all-reduced value."""
        self._reshard_all()  # gathered copies would go stale under the update
        return optimizer_step(self.transformer, self.optimizer, max_grad_norm)

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]:
        """Collective. Rank 0 (every rank with ``rank0_only=False``) gets the full CPU fp32 state;
        the others an empty dict. Gathered one tensor at a time, so accelerator memory holds at
        most one full parameter beyond the shards."""
        return _merged(self.module, self._gathered(self.transformer.state_dict().items(), rank0_only))

    def trainable_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]:
        """Collective, as :meth:`full_state_dict`: the trainable parameters alone."""
        params = [(n, p) for n, p in self.transformer.named_parameters() if p.requires_grad]
        return self._gathered(params, rank0_only)

    @staticmethod
    def _gathered(items, rank0_only: bool) -> dict[str, Tensor]:
        from torch.distributed.tensor import DTensor

        keep = not rank0_only or _is_rank0()
        out: dict[str, Tensor] = {}
        for name, value in items:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            if keep:
                out[name] = _to_cpu_fp32(full)
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Every rank passes the same full state; each copies its own shard in place (no
        communication, and the optimizer keeps its parameters)."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        _check_keys(state, list(self.transformer.state_dict()))
        named = dict(self.transformer.named_parameters())
        named.update(dict(self.transformer.named_buffers()))
        for name, target in named.items():
            if name not in state:  # a non-persistent buffer
                continue
            src = state[name].to(device=target.device, dtype=target.dtype)
            if isinstance(target, DTensor):
                # src_data_rank=None: slice the local copy, as every rank holds the full tensor.
                shard = distribute_tensor(src, target.device_mesh, target.placements, src_data_rank=None)
                target.to_local().copy_(shard.to_local())
            else:
                target.copy_(src)


# ------------------------------------------------------------------------------------------ DeepSpeed


# The only non-tensor types DeepSpeed's ZeRO-2/3 checkpoints pickle (found by loading them with
# weights_only=True: tests/test_parallel.py reads and resumes both stages this way).
DEEPSPEED_SAFE_GLOBALS = (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                          ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                          ("deepspeed.utils.tensor_fragment", "fragment_address"))


@contextmanager
def _deepspeed_weights_only() -> Iterator[None]:
    """DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``, which can run code
    from a file. Within this context each of its ``torch.load`` calls is made with ``weights_only=True``,
    allowing only the DeepSpeed types its checkpoints hold (plain classes, an enum, a dataclass)."""
    allowed = [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_SAFE_GLOBALS]
    original = torch.load

    def weights_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(allowed):
        torch.load = weights_only_load
        try:
            yield
        finally:
            torch.load = original


def _import_deepspeed(device: torch.device):
    """deepspeed, with its accelerator matching ``device``.

    DeepSpeed picks one accelerator per process when first imported; a CPU learner on a GPU host
    needs DS_ACCELERATOR=cpu before that. On the CPU, DeepSpeed also JIT-compiles a shared-memory
    all-reduce extension the first time its communication backend starts (about 30 s and a C++
    compiler); that kernel serves only ``inference_all_reduce``, never training, so it is skipped.
    """
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator().device_name()
    if accel != device.type:
        raise RuntimeError(f"DeepSpeed's accelerator is {accel!r} but the learner device is {device}; "
                           f"set DS_ACCELERATOR={device.type} before deepspeed is first imported")
    if device.type == "cpu":
        import deepspeed.ops as ds_ops

        ds_ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(zero_stage: int, max_grad_norm: float, bf16: bool) -> dict:
    """The DeepSpeed config of the SRPO learner.

    - ``managed_gradient_accumulation: false`` with 1 accumulation step: every ``engine.backward``
      only accumulates (the branches of one SRPO step), ``engine.step`` is the boundary that
      finalises, clips and steps. The default (managed, GAS 1) treats every backward as a boundary
      and the second branch's gradients overwrite the first's in ZeRO-2 (measured).
    - bf16: fp32 gradient accumulation and reduction, as FSDP2's reduce_dtype.
    """
    cfg: dict = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; batching is ours
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        # torch.optim.AdamW is the single-process optimizer (parity); DeepSpeed calls it "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        cfg["communication_data_type"] = "fp32"
    return cfg


class DeepSpeedZeroEngine:
    """DeepSpeed ZeRO-2 (optimizer state and gradients partitioned) or ZeRO-3 (parameters too).

    ``transformer`` is the DeepSpeedEngine (its forward runs ZeRO-3's gathers); the plain module is
    ``transformer.module``. ``optimizer`` is DeepSpeed's ZeRO optimizer around torch AdamW, whose
    math is the single-process AdamW's on flat fp32 partitions.
    """

    name = "deepspeed"

    def gathered_for_inference(self) -> AbstractContextManager:
        """ZeRO-2 keeps whole parameters; ZeRO-3 gathers per forward (its prefetcher overlaps the
        gathers with compute; gathering the whole model at once would cost its full size)."""
        return nullcontext()

    def step_scope(self, backwards: int) -> AbstractContextManager:
        return nullcontext()  # DeepSpeed's engine accumulates and reduces on its own schedule

    def __init__(self, transformer: nn.Module, optim_cfg: OptimConfig, device: torch.device,
                 mixed_precision: str, activation_checkpointing: bool, zero_stage: int = 2) -> None:
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"learner.zero_stage: got {zero_stage!r}, expected one of {list(ZERO_STAGES)}")
        _require_process_group("deepspeed")
        _set_current_device(device)
        self._ds = _import_deepspeed(device)
        self.zero_stage = zero_stage
        transformer = transformer.to(device).train()
        if activation_checkpointing:
            _enable_activation_checkpointing(transformer)
        o = optim_cfg
        # DeepSpeed's bf16 mode keeps the whole module in bf16 and fp32 masters for these alone.
        base = build_optimizer(_trainable(transformer), o.lr, o.betas, o.eps, o.weight_decay)
        config = deepspeed_config(zero_stage, o.max_grad_norm, _bf16_compute(device, mixed_precision))
        engine, optimizer, _, _ = self._ds.initialize(model=transformer, optimizer=base, config=config,
                                                      dist_init_required=False)
        self.transformer = engine
        self.module = engine.module
        self.optimizer = optimizer
        self._frozen = any(not p.requires_grad for p in self.module.parameters())

    @staticmethod
    def read_model_weights(ds_dir: Path) -> dict[str, torch.Tensor]:
        """DeepSpeed ZeRO-2/3 partitions consolidated to fp32 with DeepSpeed's own zero_to_fp32 (CPU only).

        DeepSpeed's files are read with ``weights_only=True`` (:func:`_deepspeed_weights_only`).
        """
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional dependency

        tag = "zero" if (ds_dir / "zero").is_dir() else None  # DeepSpeedZeroEngine.save_sharded's tag
        if tag is None and not (ds_dir / "latest").is_file():
            raise ValueError(f"{ds_dir}: no zero/ tag folder and no 'latest' file; expected "
                             "DeepSpeedZeroEngine.save_sharded's checkpoint")
        with _deepspeed_weights_only():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def save_sharded(self, path: str) -> None:
        """Collective: DeepSpeed's own ZeRO checkpoint (partitioned optimizer state) under ``path``;
        without frozen parameters (a LoRA run's base, reloaded from the base model at start)."""
        self.transformer.save_checkpoint(path, tag="zero", exclude_frozen_parameters=self._frozen)

    def load_sharded(self, path: str) -> None:
        """Collective. DeepSpeed's files are read with ``weights_only=True`` (:func:`_deepspeed_weights_only`)."""
        with _deepspeed_weights_only():
            load_path, _ = self.transformer.load_checkpoint(path, tag="zero", load_optimizer_states=True,
                                                            load_lr_scheduler_states=False,
                                                            load_module_strict=not self._frozen)
        if load_path is None:
            raise FileNotFoundError(f"{path}: no DeepSpeed checkpoint (tag 'zero') to resume from")

    def backward(self, loss: Tensor) -> None:
        self.transformer.backward(loss)
        # ZeRO decides "copy or accumulate" into its gradient partitions from a micro-step counter
        # that it advances at the start of the *next forward*. With all branch forwards before the
        # backwards (srpo_backward's overlapped remote-reward path), ZeRO-3 would copy every
        # branch's gradient over the previous one (measured). Advancing it here, right after each
        # backward, is what the next forward would do; the forward then finds nothing left to do.
        self.transformer.optimizer.clear_backward_seen_flag()

    def step(self, max_grad_norm: float) -> float:
        """Finalise the accumulated gradients, clip the global norm, AdamW, zero the gradients.

        The norm is DeepSpeed's global norm (an all-reduce over the partitions), the same on every
        rank. Its clip factor is max_norm / (norm + 1e-6), as ``clip_grad_norm_``'s.
        """
        zero_opt = self.transformer.optimizer
        if zero_opt.clip_grad != max_grad_norm:  # the config's value is the default; a call may change it
            zero_opt.clip_grad = max_grad_norm
        self.transformer.step()
        norm = self.transformer.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm=false?)")
        return float(norm)

    def _params_and_buffers(self) -> list[tuple[str, Tensor]]:
        module = self.transformer.module
        persistent = set(module.state_dict(keep_vars=True))
        items = [(n, p) for n, p in module.named_parameters()] + \
                [(n, b) for n, b in module.named_buffers() if n in persistent]
        return items

    def full_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]:
        """Collective. The fp32 master weights (not the bf16 compute copy), gathered one parameter at a
        time; rank 0 (every rank with ``rank0_only=False``) keeps them on the CPU, others get {}."""
        return _merged(self.module, self._gathered(self._params_and_buffers(), rank0_only))

    def trainable_state_dict(self, rank0_only: bool = True) -> dict[str, Tensor]:
        """Collective, as :meth:`full_state_dict`: the trainable parameters alone."""
        return self._gathered([(n, p) for n, p in self.module.named_parameters() if p.requires_grad], rank0_only)

    def _gathered(self, items, rank0_only: bool) -> dict[str, Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        keep = not rank0_only or _is_rank0()
        out: dict[str, Tensor] = {}
        for name, tensor in items:
            full = safe_get_full_fp32_param(tensor) if isinstance(tensor, nn.Parameter) else tensor
            if full is None:  # a frozen parameter: DeepSpeed keeps no fp32 master for it
                full = self._gather_param(tensor)
            if keep:
                out[name] = _to_cpu_fp32(full.reshape(self._shape(tensor)))
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Every rank passes the same full state. Both copies are written: the module parameters
        (what the forward reads; ZeRO-3 re-partitions them from rank 0) and the fp32 master
        partitions in the optimizer (what the next step updates)."""
        from deepspeed.utils import safe_set_full_fp32_param

        items = self._params_and_buffers()
        _check_keys(state, [n for n, _ in items])
        for name, tensor in items:
            src = state[name]
            if isinstance(tensor, nn.Parameter) and hasattr(tensor, "ds_id"):  # ZeRO-3 partitioned
                with self._ds.zero.GatheredParameters([tensor], modifier_rank=0):
                    tensor.data.copy_(src.to(device=tensor.device, dtype=tensor.dtype))
            else:
                tensor.data.copy_(src.to(device=tensor.device, dtype=tensor.dtype))
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:  # frozen ones have no master
                master = src.to(device=self._master_device(), dtype=torch.float32)
                safe_set_full_fp32_param(tensor, master)

    # -- small helpers -----------------------------------------------------------------------------
    def _gather_param(self, p: Tensor) -> Tensor:
        if hasattr(p, "ds_id"):
            with self._ds.zero.GatheredParameters([p]):
                return p.data.clone()
        return p.data

    @staticmethod
    def _shape(t: Tensor) -> torch.Size:
        return t.ds_shape if hasattr(t, "ds_shape") else t.shape

    @staticmethod
    def _master_device() -> str:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().current_device_name()
