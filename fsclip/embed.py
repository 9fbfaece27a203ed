"""Embeddings of an image collection as Parquet shards plus a manifest, resumable after any crash.

    from fsclip.embed import embed
    report = embed(["photos/", "more.txt"], "emb/", "ViT-B-32@laion2b_s34b_b79k", shard_size=10_000)

An output folder holds:

    OUT/manifest.json               model (spec, weights fingerprint, dim), storage dtype, shard list with
                                    row counts and SHA-256, files that could not be used and why
    OUT/shards/part-00000.parquet   one row per image, in input order: path, hash, size, mtime_ns, width,
                                    height, embedding (fixed_size_list<float32 | float16>[dim])
    OUT/progress.jsonl              the resume journal: one line per finished shard

`pyarrow.parquet.read_table("OUT/shards")` (or pandas, Ray, Spark, DuckDB) reads the shards directly.

Inputs (folders, text files listing paths, CSV/Parquet tables with a path column, URIs) are expanded,
deduplicated and sorted, then cut into shards of `shard_size`, so shard i always holds the same images.
A shard is finished once its Parquet file has been renamed into place (written atomically) and its line
is in the journal. A rerun skips finished shards and recomputes the others, replacing any file a killed
run left unrecorded, so a run killed at any point resumes with no duplicate and no lost row. A rerun
with another model, shard size, dtype or input set is refused: one folder holds one consistent job.

The per-image work (`probe`: bytes -> content hash, size, mtime, pixel size; `load_image` and the
model's transform; `Backend.encode_images`) is the same whichever runner does it; a runner ("local":
this process, below; "ray": `fsclip.distributed.ray`) only decides where it runs.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import importlib
import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from fsclip import _remote
from fsclip._io import atomic_write
from fsclip._version import __version__
from fsclip.errors import DataError, UsageError
from fsclip.images import IMAGE_EXTENSIONS, ImageLoadError, find_images

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "EmbedReport",
    "ImageMeta",
    "Shard",
    "ShardResult",
    "embed",
    "iter_tables",
    "list_inputs",
    "probe",
    "read_manifest",
    "run_local",
    "shard_bytes",
    "shard_schema",
]

logger = logging.getLogger(__name__)

FORMAT = "fsclip-embeddings"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 10_000
PATH_COLUMNS = ("path", "uri", "url")
LIST_SUFFIXES = frozenset({".txt", ".lst", ".list"})
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
StorageDtype = Literal["float32", "float16"]
# Runners by name: the module with the runner's `check_options`, `driver_model` and `run`, imported only
# when chosen (ray is optional).
RUNNERS = {"local": "fsclip.embed", "ray": "fsclip.distributed.ray"}

_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


# -- one image

@dataclass(frozen=True)
class ImageMeta:
    """What a shard row says about its file besides the embedding."""

    hash: str  # blake2b-128 hex digest of the bytes, the content hash the search index stores
    size: int
    mtime_ns: int | None  # None where a remote store does not say
    width: int | None  # as displayed (EXIF rotation applied); None when the header cannot be read
    height: int | None


def probe(uri: str) -> tuple[ImageMeta, bytes]:
    """Read one file (local path or URI): its metadata and its bytes, or `ImageLoadError` with the reason."""
    try:
        if _remote.is_uri(uri):
            data, mtime_ns = _remote.read(uri)
        else:
            with open(uri, "rb") as f:
                data = f.read()
                mtime_ns = os.fstat(f.fileno()).st_mtime_ns
    except FileNotFoundError:
        raise ImageLoadError("no such file") from None
    except OSError as e:
        raise ImageLoadError(f"cannot read: {e.strerror or e}") from None
    if not data:
        raise ImageLoadError("empty file")
    width = height = None
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only
            width, height = img.size
            if img.getexif().get(_ORIENTATION) in _SWAPS_SIDES:
                width, height = height, width
    except Exception:  # noqa: BLE001 - any decoder failure: decoding reports the real reason
        width = height = None
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return ImageMeta(digest, len(data), mtime_ns, width, height), data


# -- inputs

def list_inputs(sources: Iterable[str | os.PathLike], column: str | None = None) -> list[str]:
    """Expand `sources` into the sorted, deduplicated list of images to embed.

    A source is a folder (walked like `index build`: image extensions, hidden entries skipped), a text
    file listing one path or URI per line (`.txt`, `.lst`; `#` comments), a CSV or Parquet table with a
    `path`, `uri` or `url` column (or `column`), a URI prefix to list, or one image file. Relative paths
    inside a list or table are relative to that file's folder. Local paths come back absolute.
    A source that does not exist or cannot be read is a `DataError`.
    """
    found: set[str] = set()
    for source in sources:
        found.update(_expand(os.fspath(source), column))
    schemes = {}
    for uri in found:
        if _remote.is_uri(uri):
            schemes.setdefault(uri.split("://", 1)[0].lower(), uri)
    for uri in schemes.values():  # a missing filesystem package fails here, before any work
        _remote.filesystem(uri)
    return sorted(found)


def _expand(source: str, column: str | None) -> list[str]:
    if _remote.is_uri(source):
        fs, path = _remote.filesystem(source)
        suffix = posixpath.splitext(path)[1].lower()
        if suffix in LIST_SUFFIXES or suffix in TABLE_SUFFIXES:
            base = source.rsplit("/", 1)[0]
            with _opened(source, lambda: fs.open(path, "rb")) as f:
                return _entries(f.read(), suffix, source, base, column)
        try:
            if fs.isdir(path):
                return sorted(fs.unstrip_protocol(p) for p in fs.find(path) if _is_image_name(p, path))
            if fs.exists(path):
                return [source]
        except OSError as e:
            raise DataError(f"cannot read {source}: {e}") from None
        raise DataError(f"no such file or folder: {source}")
    path = Path(source).expanduser()
    if path.is_dir():
        images, _ = find_images([path])
        return [os.path.abspath(p) for p in images]
    if not path.exists():
        raise DataError(f"no such file or folder: {source}")
    suffix = path.suffix.lower()
    if suffix in LIST_SUFFIXES or suffix in TABLE_SUFFIXES:
        with _opened(source, lambda: open(path, "rb")) as f:
            return _entries(f.read(), suffix, source, str(path.resolve().parent), column)
    return [os.path.abspath(path)]


@contextlib.contextmanager
def _opened(name: str, opener: Callable) -> Iterator:
    """`with _opened(name, opener) as f`: an unreadable source becomes one `DataError` line."""
    try:
        f = opener()
    except OSError as e:
        raise DataError(f"cannot read {name}: {e.strerror or e}") from None
    with f:
        yield f


def _is_image_name(path: str, root: str) -> bool:
    rel = posixpath.relpath(path, root)
    return (posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in rel.split("/")))


def _entries(data: bytes, suffix: str, source: str, base: str, column: str | None) -> list[str]:
    if suffix in LIST_SUFFIXES:
        lines = data.decode("utf-8-sig").splitlines()
        values = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
    elif TABLE_SUFFIXES[suffix] == "csv":
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        name = _path_column(reader.fieldnames or [], source, column)
        values = [row[name].strip() for row in reader if (row.get(name) or "").strip()]
    else:
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read {source} as Parquet: {e}") from None
        name = _path_column(table.column_names, source, column)
        values = [v for v in table.column(name).to_pylist() if v]
    return [_resolve(str(v), base) for v in values]


def _path_column(names: Sequence[str], source: str, column: str | None) -> str:
    wanted = (column,) if column else PATH_COLUMNS
    by_lower = {n.lower(): n for n in names}
    for want in wanted:
        if want in names:
            return want
        if want.lower() in by_lower:
            return by_lower[want.lower()]
    looked = f"column {column!r}" if column else f"a {', '.join(PATH_COLUMNS[:-1])} or {PATH_COLUMNS[-1]} column"
    raise DataError(f"{source} has no {looked} (columns: {', '.join(names) or 'none'}); "
                    "name the path column with --column")


def _resolve(value: str, base: str) -> str:
    if _remote.is_uri(value):
        return value
    if _remote.is_uri(base):
        return value if value.startswith("/") else posixpath.join(base, value)
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _digest(uris: Sequence[str]) -> str:
    h = hashlib.sha256()
    for uri in uris:
        h.update(uri.encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


# -- shards

@dataclass(frozen=True)
class Shard:
    """Images `start .. start + len(uris)` of the sorted input list."""

    id: int
    start: int
    uris: tuple[str, ...]


@dataclass
class ShardResult:
    """A shard's rows (input order), their embeddings, and the files that failed (input order)."""

    shard: int
    paths: list[str]
    metas: list[ImageMeta]
    embeddings: np.ndarray  # (len(paths), D) float32, L2-normalised
    failed: list[tuple[str, str]]  # (path, reason)


def shard_schema(dim: int, dtype: StorageDtype = "float32") -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.schema([
        pa.field("path", pa.string(), nullable=False),
        pa.field("hash", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("mtime_ns", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("embedding", pa.list_(value, dim), nullable=False),
    ])


def _table(result: ShardResult, dim: int, dtype: StorageDtype) -> pa.Table:
    schema = shard_schema(dim, dtype)
    flat = np.ascontiguousarray(result.embeddings, dtype=np.float16 if dtype == "float16" else np.float32)
    if flat.size != len(result.paths) * dim:
        raise ValueError(f"shard {result.shard}: embeddings {flat.shape} for {len(result.paths)} rows of dim {dim}")
    m = result.metas
    columns = [
        pa.array(result.paths, pa.string()),
        pa.array([x.hash for x in m], pa.string()),
        pa.array([x.size for x in m], pa.int64()),
        pa.array([x.mtime_ns for x in m], pa.int64()),
        pa.array([x.width for x in m], pa.int32()),
        pa.array([x.height for x in m], pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), schema.field("embedding").type.value_type), dim),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def shard_bytes(result: ShardResult, dim: int, dtype: StorageDtype = "float32") -> bytes:
    """The Parquet file of one shard."""
    buf = io.BytesIO()
    # embeddings do not compress and have no useful statistics; paths do compress
    pq.write_table(_table(result, dim, dtype), buf, compression="zstd", use_dictionary=False,
                   write_statistics=["path", "size", "mtime_ns", "width", "height"])
    return buf.getvalue()


def _plan(uris: Sequence[str], shard_size: int) -> list[Shard]:
    return [Shard(i // shard_size, i, tuple(uris[i : i + shard_size])) for i in range(0, len(uris), shard_size)]


class _Output:
    """One output folder, held with an exclusive lock: manifest, journal and shard files."""

    KNOWN = frozenset({".lock", "manifest.json", "progress.jsonl", "shards"})

    def __init__(self, root: Path):
        self.root = root
        if root.exists() and not root.is_dir():
            raise UsageError(f"--out {root} is a file; choose a folder")
        if root.is_dir() and any(p.name not in self.KNOWN and not _temp(p) for p in root.iterdir()):
            raise UsageError(f"{root} exists and is not an `fsclip embed` output folder; choose another --out")
        (root / "shards").mkdir(parents=True, exist_ok=True)
        self._lock = open(root / ".lock", "a")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UsageError(f"another `fsclip embed` is writing to {root}; wait for it or choose another --out") from None
        for stale in [*root.glob(".*.tmp"), *(root / "shards").glob(".*.tmp")]:  # temp files of a killed run
            stale.unlink(missing_ok=True)
        self.manifest = _load_manifest(root) if (root / "manifest.json").exists() else None
        self.done = self._read_journal()
        umask = os.umask(0)
        os.umask(umask)
        self._mode = 0o666 & ~umask

    @property
    def journal(self) -> Path:
        return self.root / "progress.jsonl"

    def _read_journal(self) -> dict[int, dict]:
        if not self.journal.exists():
            return {}
        raw = self.journal.read_bytes()
        if raw and not raw.endswith(b"\n"):  # killed mid-append: drop the torn line
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.journal, "r+b") as f:
                f.truncate(len(raw))
        done = {}
        for line in raw.splitlines():
            rec = json.loads(line)
            f = self.root / rec["file"]
            if f.is_file() and f.stat().st_size == rec["bytes"]:  # a deleted or replaced file is recomputed
                done[rec["shard"]] = rec
        return done

    def write_shard(self, result: ShardResult, dim: int, dtype: StorageDtype) -> dict:
        name = f"shards/part-{result.shard:05d}.parquet"
        data = shard_bytes(result, dim, dtype)
        with atomic_write(self.root / name) as f:
            os.fchmod(f.fileno(), self._mode)  # a normal file for other readers, not mkstemp's 0600
            f.write(data)
        rec = {"shard": result.shard, "file": name, "rows": len(result.paths), "bytes": len(data),
               "sha256": hashlib.sha256(data).hexdigest(), "failed": [list(x) for x in result.failed]}
        with open(self.journal, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[result.shard] = rec
        return rec

    def write_manifest(self, manifest: dict) -> None:
        with atomic_write(self.root / "manifest.json", "w") as f:
            os.fchmod(f.fileno(), self._mode)
            json.dump(manifest, f, indent=1, ensure_ascii=False)
            f.write("\n")
        self.manifest = manifest

    def close(self) -> None:
        self._lock.close()


def _temp(path: Path) -> bool:
    """A temp file of `atomic_write` (`.NAME.XXXX.tmp`), left behind when a run is killed mid-write."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def _load_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {root / 'manifest.json'}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{root} is not an `fsclip embed` output folder (its manifest.json is something else)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{root} was written by a newer fsclip (format {manifest['format_version']}); upgrade fsclip")
    return manifest


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of an `fsclip embed` output folder (`status` is "complete" once every shard is done)."""
    return _load_manifest(Path(out))


def iter_tables(out: str | os.PathLike, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """The shards of a complete output folder as Arrow tables, in order; refuses an unfinished run."""
    root = Path(out)
    manifest = _load_manifest(root)
    if manifest.get("status") != "complete":
        raise DataError(f"{root} is an unfinished `fsclip embed` run; rerun the same command to finish it")
    for shard in manifest["shards"]:
        yield pq.read_table(root / shard["file"], columns=list(columns) if columns else None)


# -- the job

@dataclass(frozen=True)
class EmbedReport:
    """What one `embed` call did.

    Attributes:
        out: the output folder.
        runner: local or ray.
        images: inputs after expansion and deduplication.
        rows: embedded images in the output (all shards).
        failed: files that could not be used (listed with reasons in the manifest).
        shards: shards in the output.
        computed: shards computed by this call.
        resumed: shards finished by an earlier run and skipped.
        embedded: images embedded by this call.
        seconds: wall time.
    """

    out: str
    runner: str
    images: int
    rows: int
    failed: int
    shards: int
    computed: int
    resumed: int
    embedded: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def embed(
    sources: Iterable[str | os.PathLike],
    out: str | os.PathLike,
    model: str = "ViT-B-32@laion2b_s34b_b79k",
    *,
    runner: str = "local",
    shard_size: int = DEFAULT_SHARD_SIZE,
    fp16: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    column: str | None = None,
    progress: bool = False,
    runtime: str = "torch",
    **runner_options,
) -> EmbedReport:
    """Embed every image of `sources` into Parquet shards under `out`; rerun the same call to resume.

    Args:
        model: model spec (see `fsclip.load_model`).
        runner: "local" (this process) or "ray" (`pip install 'fsclip[ray]'`).
        shard_size: images per shard; fixed for the life of an output folder.
        fp16: store embeddings as float16 (half the bytes; computed in `dtype` regardless).
        dtype: compute dtype (auto: fp16 on CUDA, fp32 elsewhere).
        column: the path column of CSV/Parquet sources (default: path, uri or url).
        runtime: what runs the model (see `fsclip.runtime`); an ONNX runtime is gated on the first local
            images of `sources`.
        runner_options: the runner's own options (local: `workers`; ray: `address`,
            `num_gpus_per_worker`, `actors`).
    """
    t0 = time.perf_counter()
    sources = [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]
    if runner not in RUNNERS:
        raise UsageError(f"unknown runner {runner!r}; choose one of: {', '.join(RUNNERS)}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    run_module = importlib.import_module(RUNNERS[runner])
    run_module.check_options(**runner_options)
    storage: StorageDtype = "float16" if fp16 else "float32"
    spec = os.path.abspath(model) if os.path.isdir(model) else model  # workers elsewhere need no cwd
    uris = list_inputs(sources, column)
    if not uris:
        raise DataError(f"no images found in {', '.join(sources)}")
    job = {"model": spec, "shard_size": shard_size, "dtype": storage,
           "inputs": {"count": len(uris), "sha256": _digest(uris)}}

    output = _Output(Path(out))
    try:
        if output.manifest is not None:
            _check_same_job(output.root, output.manifest, job)
        shards = _plan(uris, shard_size)
        pending = [s for s in shards if s.id not in output.done]
        resumed = len(shards) - len(pending)
        embedded = 0
        if pending or output.manifest is None:
            from fsclip.backends import load_model

            load_device, load_dtype = run_module.driver_model(device, dtype, **runner_options)
            calibration = [u for u in uris[:256] if "://" not in u]
            backend = load_model(spec, device=load_device, dtype=load_dtype, runtime=runtime, calibration=calibration)
            model_rec = {"spec": spec, "backend": backend.name, "fingerprint": backend.fingerprint,
                         "dim": backend.embed_dim, "compute_dtype": str(backend.dtype).removeprefix("torch."),
                         "runtime": backend.runtime, "has_text": backend.has_text}
            if output.manifest is not None:
                _check_same_model(output.root, output.manifest["model"], model_rec)
            output.write_manifest(_manifest(job, model_rec, shards, output.done, "running"))
            counts = {"embedded": 0}

            def write(result: ShardResult) -> None:
                output.write_shard(result, model_rec["dim"], storage)
                counts["embedded"] += len(result.paths)

            run_module.run(backend, pending, write, batch_size=batch_size, progress=progress, device=device,
                           **runner_options)
            embedded = counts["embedded"]
            missing = [s.id for s in shards if s.id not in output.done]
            if missing:
                raise RuntimeError(f"runner {runner!r} returned without shards {missing[:5]}")
        manifest = _manifest(job, output.manifest["model"], shards, output.done, "complete")
        output.write_manifest(manifest)
    finally:
        output.close()
    return EmbedReport(out=str(out), runner=runner, images=len(uris), rows=manifest["rows"],
                       failed=len(manifest["failed"]), shards=len(shards), computed=len(shards) - resumed,
                       resumed=resumed, embedded=embedded, seconds=time.perf_counter() - t0)


def _manifest(job: dict, model: dict, shards: list[Shard], done: dict[int, dict], status: str) -> dict:
    records = [done[s.id] for s in shards if s.id in done]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fsclip_version": __version__, "status": status,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model, "dtype": job["dtype"], "shard_size": job["shard_size"], "inputs": job["inputs"],
        "rows": sum(r["rows"] for r in records),
        "columns": {"path": "string", "hash": "blake2b-128 hex of the file's bytes", "size": "bytes",
                    "mtime_ns": "int64, null where unknown", "width": "int32", "height": "int32",
                    "embedding": f"fixed_size_list<{job['dtype']}>[{model['dim']}], L2-normalised"},
        "shards": [{k: r[k] for k in ("shard", "file", "rows", "bytes", "sha256")} for r in records],
        "failed": [{"path": p, "reason": why} for r in records for p, why in r["failed"]],
    }


def _check_same_job(root: Path, manifest: dict, job: dict) -> None:
    hint = "rerun with the same options or choose another --out"
    if manifest["model"]["spec"] != job["model"]:
        raise UsageError(f"{root} holds embeddings from --model {manifest['model']['spec']}, not {job['model']}; {hint}")
    if manifest["shard_size"] != job["shard_size"]:
        raise UsageError(f"{root} was sharded with --shard-size {manifest['shard_size']}, not {job['shard_size']}; {hint}")
    if manifest["dtype"] != job["dtype"]:
        flag = "with" if manifest["dtype"] == "float16" else "without"
        raise UsageError(f"{root} stores {manifest['dtype']} embeddings (run {flag} --fp16); {hint}")
    if manifest["inputs"] != job["inputs"]:
        raise UsageError(f"{root} was started on a different set of images ({manifest['inputs']['count']} then, "
                         f"{job['inputs']['count']} now); rerun with the same sources or choose another --out")


def _check_same_model(root: Path, old: dict, new: dict) -> None:
    if old["compute_dtype"] != new["compute_dtype"]:
        raise UsageError(f"{root} was computed in {old['compute_dtype']}, this run would use {new['compute_dtype']}; "
                         "pass the same --dtype or choose another --out")
    if old.get("runtime", "torch") != new["runtime"]:
        raise UsageError(f"{root} was computed with runtime {old.get('runtime', 'torch')}, this run would use "
                         f"{new['runtime']}; pass the same --runtime or choose another --out")
    if old["fingerprint"] != new["fingerprint"]:
        raise UsageError(f"the weights of {new['spec']} changed since {root} was started (fingerprint "
                         f"{old['fingerprint']}, now {new['fingerprint']}); choose another --out")


# -- the local runner: this process, decoding in threads overlapped with the model

def check_options(workers: int | None = None) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")


def driver_model(device: str, dtype: str, workers: int | None = None) -> tuple[str, str]:
    """Where this process loads the model: it is the one that embeds."""
    return device, dtype


def _probe_meta(uri: str) -> ImageMeta | str:
    try:
        return probe(uri)[0]
    except ImageLoadError as e:
        logger.warning("skipping %s: %s", uri, e)
        return str(e)


def run_local(backend, shards: Sequence[Shard], write: Callable[[ShardResult], None], *, batch_size: int = 32,
              progress: bool = False, device: str | None = None, workers: int | None = None) -> None:
    """Embed `shards` in this process with `fsclip.encode.iter_encoded`, one shard after another.

    File metadata (`probe`) is read in a thread pool one shard ahead, so it overlaps the encoding.
    """
    from fsclip.encode import iter_encoded

    bar = tqdm(total=sum(len(s.uris) for s in shards), unit="img", desc="embedding",
               disable=None if progress else True, smoothing=0.1)
    threads = workers or min(4, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsclip-probe") as pool:
            ahead = [pool.submit(_probe_meta, u) for u in shards[0].uris] if shards else []
            for k, shard in enumerate(shards):
                probed = [f.result() for f in ahead]
                if k + 1 < len(shards):
                    ahead = [pool.submit(_probe_meta, u) for u in shards[k + 1].uris]
                failed = {u: m for u, m in zip(shard.uris, probed) if isinstance(m, str)}
                ok = [(u, m) for u, m in zip(shard.uris, probed) if not isinstance(m, str)]
                bar.update(len(failed))
                paths = [u for u, _ in ok]
                emb = np.zeros((len(paths), backend.embed_dim), np.float32)
                loaded = np.zeros(len(paths), bool)
                for batch in iter_encoded(backend, paths, batch_size=batch_size, num_workers=workers):
                    emb[batch.indices] = batch.features.float().cpu().numpy()
                    loaded[batch.indices] = True
                    failed.update((paths[i], reason) for i, reason in batch.errors)
                    bar.update(len(batch.indices) + len(batch.errors))
                keep = np.flatnonzero(loaded)
                write(ShardResult(shard.id, [paths[i] for i in keep], [ok[i][1] for i in keep], emb[keep],
                                  sorted(failed.items())))
    finally:
        bar.close()


run = run_local
