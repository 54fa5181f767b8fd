"""Where a run's files live: ``output.dir`` as a local folder (or a shared mount), or a URI of any
filesystem pyarrow knows (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``). These are the
filesystems Ray Train's ``storage_path`` accepts, so a Ray run's checkpoints and its run files
(run.json, config.yaml, the export, ``best/``, single-process checkpoints) sit side by side.

A local folder is used in place. For a URI, files are written into a local staging folder (one
per URI, under ``SRPO_STAGING_DIR``, default ``<tmp>/srpo-staging``) and then uploaded whole; they
are read by downloading them into that folder. Object stores have no rename, so what keeps a
reader from seeing half a file is that each file is uploaded only once it is complete; a folder
can name the file to upload last (a checkpoint's state file: its presence means complete).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def staging_root() -> Path:
    return Path(os.environ.get("SRPO_STAGING_DIR") or Path(tempfile.gettempdir()) / "srpo-staging")


def read_text(location: str | Path) -> str:
    """A small file (JSON) at a local path or a URI; FileNotFoundError when it is not there."""
    if not is_uri(location):
        return Path(location).read_text()
    fs, path = pafs.FileSystem.from_uri(str(location))
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: not found")
    with fs.open_input_stream(path) as f:
        return f.read().decode()


class RunStorage:
    """A run folder on its filesystem. ``path(rel)`` is where to write or read ``rel`` locally;
    ``upload(rel)`` publishes it, ``download(rel)`` fetches it (both no-ops for a local folder)."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location).rstrip("/")
        self.fs: pafs.FileSystem | None = None
        if is_uri(self.location):
            self.fs, self.root = pafs.FileSystem.from_uri(self.location)
            self.local = staging_root() / hashlib.sha1(self.location.encode()).hexdigest()[:16]
        else:
            self.root = str(Path(self.location).resolve())
            self.local = Path(self.root)
        self.local.mkdir(parents=True, exist_ok=True)

    @property
    def remote(self) -> bool:
        return self.fs is not None

    def path(self, rel: str) -> Path:
        return self.local / rel

    def uri(self, rel: str = "") -> str:
        """``rel`` as the storage names it: a URI for a remote run, an absolute path for a local one."""
        base = self.location if self.remote else str(self.local)
        return f"{base}/{rel}" if rel else base

    def upload(self, rel: str, last: str | None = None) -> None:
        """Publish the staged file or folder ``rel``; within a folder, ``last`` (a file name) goes up
        after everything else, so its presence in storage means the folder is complete."""
        if not self.remote:
            return
        src, dest = self.local / rel, f"{self.root}/{rel}"
        if src.is_file():
            self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(src), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
            return
        files = sorted(p for p in src.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)  # stable: `last` moves to the end
        for f in files:
            self.upload(str(f.relative_to(self.local)))

    def download(self, rel: str) -> Path | None:
        """The local copy of the file or folder ``rel``, fetched from storage; None when there is none."""
        local = self.local / rel
        if not self.remote:
            return local if local.exists() else None
        info = self.fs.get_file_info(f"{self.root}/{rel}")
        if info.type == pafs.FileType.NotFound:
            return None
        if info.type == pafs.FileType.Directory:
            shutil.rmtree(local, ignore_errors=True)  # no stale files from an earlier copy
            local.mkdir(parents=True)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{self.root}/{rel}", str(local), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local

    def listdir(self, rel: str) -> list[str]:
        """Names of the entries of folder ``rel`` in storage (empty when it does not exist)."""
        if not self.remote:
            folder = self.local / rel
            return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{rel}", allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def delete(self, rel: str) -> None:
        """Remove folder ``rel`` from storage and from the staging copy."""
        shutil.rmtree(self.local / rel, ignore_errors=True)
        if self.remote and self.fs.get_file_info(f"{self.root}/{rel}").type == pafs.FileType.Directory:
            self.fs.delete_dir(f"{self.root}/{rel}")
