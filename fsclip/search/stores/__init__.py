"""Vector stores behind `ImageIndex`: the interface (`base`) and its engines (`faiss`, `milvus`)."""

from fsclip.search.stores import faiss, milvus
from fsclip.search.stores.base import (
    Entry,
    IndexChangedError,
    Snapshot,
    Store,
    create_store,
    engine_for,
    list_engines,
    open_store,
    register_store,
)

__all__ = ["Entry", "IndexChangedError", "Snapshot", "Store", "create_store", "engine_for", "faiss", "list_engines", "milvus",
           "open_store", "register_store"]
