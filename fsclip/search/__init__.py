"""Semantic image search: an on-disk index (SQLite metadata + FAISS vectors) searched by text or example.

    from fsclip.search import ImageIndex
    index = ImageIndex.create("my.idx", "shapes")
    index.add(["photos/"])
    hits = index.search(text="a red circle", k=10, where={"path_glob": "*.png"})
"""

from fsclip.search.faiss_index import AnnConfig
from fsclip.search.index import ImageIndex, IndexChangedError, SearchHit, Snapshot
from fsclip.search.query import Where
from fsclip.search.update import UpdateReport

__all__ = ["AnnConfig", "ImageIndex", "IndexChangedError", "SearchHit", "Snapshot", "UpdateReport", "Where"]
