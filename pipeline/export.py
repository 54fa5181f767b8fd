"""Writing trained weights: consolidated safetensors, atomically (a crash never leaves half a file)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, step: int | None = None) -> Path:
    """``state`` -> safetensors at ``path`` via a temporary file and an atomic rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": "pt"}
    if step is not None:
        metadata["srpo_step"] = str(step)
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
