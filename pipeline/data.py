"""Prompt files: a text file (one prompt a line) or a parquet file with a ``caption`` column."""
from __future__ import annotations

from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts in file order; blank lines are dropped (they carry no caption to align to)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: prompts file not found; expected a .txt (one prompt a line) or .parquet")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if "caption" not in table.column_names:
            raise ValueError(f"{p}: parquet has columns {table.column_names}; expected a 'caption' column")
        prompts = [str(c).strip() for c in table.column("caption").to_pylist() if c is not None]
    else:
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x]
    if not prompts:
        raise ValueError(f"{p}: no non-empty prompt; expected at least one caption")
    return prompts
