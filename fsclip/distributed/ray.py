"""The Ray runner of `fsclip embed` (`pip install 'fsclip[ray]'`): one Ray Data pipeline.

    fsclip embed /shared/photos --out /shared/emb --runner ray --address auto --num-gpus-per-worker 1

Over the images of the shards still to do:

1. `_decode`, in Ray tasks (parallel; Ray retries a task whose worker dies): `fsclip.embed.probe` (bytes,
   content hash, size, mtime, pixel size), then `load_image` and the model's transform -> pixels, or the
   reason the file cannot be used;
2. `_Encoder`, in an actor pool: each actor loads the model once, on the GPUs Ray assigns it
   (`num_gpus_per_worker`), checks it has the driver's weights, and embeds batches of pixels; Ray
   restarts an actor that dies and retries its batch;
3. this process gathers rows by shard and writes each shard as soon as all its rows are in, through
   the same writer as the local runner, so files, manifest and resume guarantees are the same.

`address` joins an existing cluster (`auto`, `ray://HOST:10001`, `HOST:6379`); without it a local
cluster sized to this machine is started and stopped. Every node must have fsclip installed and see the
images at the paths the driver lists (a shared file system, or URIs such as `s3://`).
"""

from __future__ import annotations

import bisect
import io
import logging
import re
import socket
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from fsclip import errors
from fsclip.embed import ImageMeta, Shard, ShardResult, probe
from fsclip.errors import FsclipError, ModelLoadError, UsageError
from fsclip.images import ImageLoadError, load_image

__all__ = ["check_options", "driver_model", "run"]

logger = logging.getLogger(__name__)
INSTALL = "pip install 'fsclip[ray]'"
_WORKER_ERROR = re.compile(r"^fsclip\.errors\.(\w+): (.+)$", re.MULTILINE)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError(f"--runner ray needs Ray Data: {INSTALL}") from None
    return ray


def check_options(address: str | None = None, num_gpus_per_worker: float = 0, actors: int | None = None) -> None:
    _ray()
    if num_gpus_per_worker < 0:
        raise UsageError(f"--num-gpus-per-worker must be >= 0, got {num_gpus_per_worker}")
    if actors is not None and actors < 1:
        raise UsageError(f"--actors must be >= 1, got {actors}")


def driver_model(device: str, dtype: str, address: str | None = None, num_gpus_per_worker: float = 0,
                 actors: int | None = None) -> tuple[str, str]:
    """The driver loads its copy (for the fingerprint, dim and transform) on the CPU, in the workers' dtype."""
    if device.startswith("cuda") and not num_gpus_per_worker:
        raise UsageError(f"--device {device} with --runner ray needs --num-gpus-per-worker (Ray assigns the GPUs)")
    if dtype == "auto":
        dtype = "fp16" if num_gpus_per_worker else "fp32"
    return "cpu", dtype


def _decode(batch: dict, transform: Callable, draft_size: int, shape: tuple[int, ...]) -> dict:
    """Ray task: paths -> metadata and model-ready pixels, or the reason per file (`error`, "" when fine)."""
    n = len(batch["row"])
    pixels = np.zeros((n, *shape), np.float32)
    ints = {k: np.full(n, -1, np.int64) for k in ("size", "mtime_ns", "width", "height")}  # -1: null
    hashes, errors = np.full(n, "", object), np.full(n, "", object)
    for i, uri in enumerate(batch["path"]):
        try:
            meta, data = probe(uri)
            pixels[i] = transform(load_image(io.BytesIO(data), draft_size=draft_size)).numpy()
        except ImageLoadError as e:
            errors[i] = str(e)
            continue
        hashes[i] = meta.hash
        for k in ints:
            value = getattr(meta, k)
            ints[k][i] = -1 if value is None else value
    return {"row": batch["row"], "path": batch["path"], "hash": hashes, **ints, "error": errors, "pixels": pixels}


def _decode_memory(batch_size: int, shape: tuple[int, ...]) -> int:
    """Bytes a decoding task reserves: the worker itself (it imports torch: Ray measured 524 MiB for
    batches of 8 small images), one full-size decode, and its batch of pixels and file bytes (up to 4 MiB a
    photo). On a node with many cores and little RAM this bounds the batches decoded at once; it also sets
    decoding apart from the model actors, which keeps Ray from fusing the two stages."""
    return (768 << 20) + batch_size * (4 * int(np.prod(shape)) + (4 << 20))


class _Encoder:
    """Ray actor: the model, loaded once; pixels -> L2-normalised float32 embeddings."""

    def __init__(self, spec: str, device: str, dtype: str, fingerprint: str, runtime: str = "torch"):
        from fsclip.backends import load_model

        self.backend = load_model(spec, device=device, dtype=dtype, runtime=runtime)
        if self.backend.fingerprint != fingerprint:
            raise ModelLoadError(f"a Ray worker loaded other weights for {spec!r} (fingerprint "
                                 f"{self.backend.fingerprint}, the driver has {fingerprint}); give every node "
                                 "the same model files")

    def __call__(self, batch: dict) -> dict:
        ok = batch["error"] == ""
        emb = np.zeros((len(ok), self.backend.embed_dim), np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            emb[ok] = self.backend.encode_images(pixels, batch_size=len(pixels)).cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        return out


class _Collector:
    """Rows arrive in any order; a shard is written once all of its rows are in."""

    def __init__(self, shards: Sequence[Shard], write: Callable[[ShardResult], None]):
        self.shards = list(shards)
        self.starts = [s.start for s in self.shards]
        self.rows: list[dict[int, tuple]] = [{} for _ in self.shards]
        self.write = write
        self.written = 0

    def add(self, batch: dict) -> None:
        for i, row in enumerate(batch["row"].tolist()):
            k = bisect.bisect_right(self.starts, row) - 1
            if batch["error"][i]:
                item = (batch["path"][i], None, batch["error"][i])
            else:
                ints = [int(batch[c][i]) for c in ("size", "mtime_ns", "width", "height")]
                meta = ImageMeta(batch["hash"][i], *(None if v < 0 else v for v in ints))
                item = (batch["path"][i], meta, batch["embedding"][i])
            self.rows[k][row] = item
            if len(self.rows[k]) == len(self.shards[k].uris):
                self._flush(k)

    def _flush(self, k: int) -> None:
        items = [self.rows[k][r] for r in sorted(self.rows[k])]
        self.rows[k] = {}
        ok = [it for it in items if it[1] is not None]
        emb = np.stack([it[2] for it in ok]) if ok else np.zeros((0, 0), np.float32)
        self.write(ShardResult(self.shards[k].id, [it[0] for it in ok], [it[1] for it in ok],
                               emb.reshape(len(ok), -1) if ok else emb,
                               [(it[0], it[2]) for it in items if it[1] is None]))
        self.written += 1


def _pool_size(ray, num_gpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    if num_gpus_per_worker:
        n = int(resources.get("GPU", 0) // num_gpus_per_worker)
        if n < 1:
            raise UsageError(f"--num-gpus-per-worker {num_gpus_per_worker:g}, but the Ray cluster has "
                             f"{resources.get('GPU', 0):g} GPUs")
        return n
    return max(1, int(resources.get("CPU", 1)) // 2)  # the other half of the CPUs decodes


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """One line when nothing listens at a HOST:PORT address; `ray.init` itself waits minutes before failing."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address or "")
    if not m:  # None, "auto", "local": Ray's own lookup
        return
    try:
        socket.create_connection((m[1], int(m[2])), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"cannot start or join the Ray cluster at {address}: nothing answers there ({e.strerror or e}); "
                         "check --address (`ray status` on the head node shows it)") from None


def run(backend, shards: Sequence[Shard], write: Callable[[ShardResult], None], *, batch_size: int = 32,
        progress: bool = False, device: str = "auto", address: str | None = None,
        num_gpus_per_worker: float = 0, actors: int | None = None) -> None:
    """Embed `shards` on a Ray cluster; `write` receives each finished shard, in this process."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
            raise UsageError(f"cannot start or join {where}: {str(e).strip().splitlines()[0]} (check --address; "
                             "`ray status` on the head node shows the address to use)") from None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        if not progress:  # Ray Data logs its progress at INFO when there is no terminal
            logging.getLogger("ray.data").setLevel(logging.WARNING)
        if not shards:
            return
        size = backend.image_size
        shape = tuple(backend.transform(Image.new("RGB", (size, size))).shape)
        dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[backend.dtype]
        rows = [(s.start + j, uri) for s in shards for j, uri in enumerate(s.uris)]
        blocks = [pa.table({"row": pa.array([r for r, _ in rows[i : i + batch_size]], pa.int64()),
                            "path": pa.array([u for _, u in rows[i : i + batch_size]], pa.string())})
                  for i in range(0, len(rows), batch_size)]
        ds = ray.data.from_arrow(blocks)
        ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"transform": backend.transform, "draft_size": size, "shape": shape},
                            memory=_decode_memory(batch_size, shape))
        ds = ds.map_batches(
            _Encoder, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"spec": backend.spec, "device": device, "dtype": dtype,
                                   "fingerprint": backend.fingerprint, "runtime": backend.runtime},
            compute=ray.data.ActorPoolStrategy(size=actors or _pool_size(ray, num_gpus_per_worker)),
            num_gpus=num_gpus_per_worker or None,
        )
        collector = _Collector(shards, write)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
        except ray.exceptions.RayError as e:
            cause = _worker_error(e)
            if cause is not None:
                raise cause from None
            raise
        if collector.written != len(shards):
            raise RuntimeError(f"Ray returned {collector.written} of {len(shards)} shards")
    finally:
        if started:
            ray.shutdown()


def _worker_error(err: BaseException) -> FsclipError | None:
    """An fsclip error raised in a worker, rebuilt from its last traceback line: Ray hands it to the
    driver as text inside its own error (e.g. `ActorDiedError` for a failed actor constructor)."""
    found = _WORKER_ERROR.findall(str(err))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    return cls(message) if isinstance(cls, type) and issubclass(cls, FsclipError) else None
