"""One published state of an index, read as a whole and checked before anyone searches it.

A reader takes one `Snapshot` per request: the FAISS index, the generation its ids belong to, the
info it was published with, and which index folder it came from. `ImageIndex.refresh` swaps in a new
snapshot (one attribute assignment) when a writer publishes or the folder is replaced, so a request
never mixes the FAISS index of one state with the metadata of another.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import faiss

from fsclip.errors import IndexError_
from fsclip.search import faiss_index as fi
from fsclip.search import store

__all__ = ["Damaged", "Republished", "Snapshot", "faiss_name", "folder_id", "read_published"]


def faiss_name(gen: int) -> str:
    return f"vectors-{gen}.faiss"


class Damaged(Exception):
    """The published FAISS file is missing or does not match meta.sqlite (the message says how)."""


class Republished(Exception):
    """The FAISS file went away because a writer published a newer generation meanwhile: read again."""


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of one published generation of one index folder.

    Attributes:
        generation: the published generation; SQLite rows visible at it are exactly `faiss`'s ids.
        info: the info table as read with it.
        faiss: the verified FAISS index, or None when the file is damaged (`damage` says why).
        folder: (st_dev, st_ino) of the index folder it was read from; another value means the
            folder was replaced (e.g. `index build --overwrite`).
        damage: why `faiss` is None.
    """

    generation: int
    info: Mapping[str, str]
    faiss: faiss.Index | None
    folder: tuple[int, int]
    damage: str | None = None

    @property
    def index_id(self) -> str | None:
        return self.info.get("index_id")

    @property
    def count(self) -> int:
        return int(self.faiss.ntotal) if self.faiss is not None else int(self.info["count"])

    @property
    def kind(self) -> str:
        return fi.index_kind(self.faiss) if self.faiss is not None else self.info.get("kind", "flat")

    def searchable(self) -> faiss.Index:
        if self.faiss is None:
            raise IndexError_(self.damage)
        return self.faiss


def folder_id(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise IndexError_(f"index {path} no longer exists") from None
    return st.st_dev, st.st_ino


def read_published(path: Path, con: sqlite3.Connection, info: Mapping[str, str]) -> faiss.Index:
    """The FAISS file of `info`'s generation, checked against meta.sqlite.

    Checks its checksum (recorded when it was published), dimension, vector count and id range, so a
    file from another index or a damaged one is never searched. Raises `Damaged` or `Republished`.
    """
    gen = int(info["generation"])
    file = path / faiss_name(gen)
    fix = f"run `fsclip index update {path}` to rebuild it from the vectors in {store.DB_NAME}"
    try:
        index, checksum = fi.read_index_checksum(file)
    except FileNotFoundError:
        if _published_generation(con) != gen:
            raise Republished from None
        raise Damaged(str(store.damaged(path, f"{file.name} is missing", fix))) from None
    except RuntimeError:
        raise Damaged(str(store.damaged(path, f"{file.name} is not a readable FAISS file", fix))) from None
    expected = info.get("faiss_checksum")
    problem = None
    if expected is not None and checksum != expected:
        problem = f"{file.name} is not the file {store.DB_NAME} recorded (checksum {checksum}, expected {expected})"
    elif index.d != int(info["dim"]):
        problem = f"{file.name} holds {index.d}-dim vectors, {store.DB_NAME} says {info['dim']}"
    elif index.ntotal != int(info["count"]):
        problem = f"{file.name} holds {index.ntotal} vectors, {store.DB_NAME} lists {info['count']}"
    else:
        ids = fi.id_range(index)
        lo, hi = con.execute("SELECT min(id), max(id) FROM files").fetchone()
        if ids is not None and (lo is None or ids[0] < lo or ids[1] > hi):
            problem = f"{file.name} holds ids {ids[0]}..{ids[1]}, not those of {store.DB_NAME}"
    if problem:
        raise Damaged(str(store.damaged(path, problem, fix)))
    return index


def _published_generation(con: sqlite3.Connection) -> int:
    row = con.execute("SELECT value FROM info WHERE key = 'generation'").fetchone()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else -1
