"""Run the real `fsclip embed` in a child process and SIGKILL it at a chosen point.

To kill at a known point rather than race a fast run, the child pauses there (a hook wrapped around one
function) and the parent sends SIGKILL from outside, as a user or the OOM killer would.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import contextlib, os, sys, time
    import fsclip.embed as embed

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    kind, _, n = os.environ["FSCLIP_TEST_KILL_AT"].partition(":")
    n = int(n)
    real_write = embed.atomic_write
    if kind == "encoding":  # inside the n-th batch the model encodes: its shard is half done
        import fsclip.encode as encode
        real_iter, calls = encode.iter_encoded, [0]
        def iter_encoded(*a, **kw):
            for batch in real_iter(*a, **kw):
                calls[0] += 1
                if calls[0] == n:
                    pause()
                yield batch
        encode.iter_encoded = iter_encoded
    elif kind == "writing":  # half of shard n's Parquet bytes are in its temp file
        class Half:
            def __init__(self, f):
                self.f = f
            def __getattr__(self, name):
                return getattr(self.f, name)
            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                pause()
        @contextlib.contextmanager
        def atomic_write(path, mode="wb"):
            with real_write(path, mode) as f:
                yield Half(f) if path.name == f"part-{n:05d}.parquet" else f
        embed.atomic_write = atomic_write
    elif kind == "renamed":  # shard n's file is in place, its journal line not written yet
        @contextlib.contextmanager
        def atomic_write(path, mode="wb"):
            with real_write(path, mode) as f:
                yield f
            if path.name == f"part-{n:05d}.parquet":
                pause()
        embed.atomic_write = atomic_write
    elif kind == "recorded":  # n shards recorded by this run; the rest still in flight
        real_shard, count = embed._Output.write_shard, [0]
        def write_shard(self, *a, **kw):
            rec = real_shard(self, *a, **kw)
            count[0] += 1
            if count[0] == n:
                pause()
            return rec
        embed._Output.write_shard = write_shard

    from fsclip.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def kill_at(tmp_path: Path, argv: list[str], where: str, timeout: float = 240) -> None:
    """Run `fsclip *argv` in a child until it reaches `where` ("encoding:N", "writing:N", "renamed:N",
    "recorded:N"), then SIGKILL it."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "FSCLIP_TEST_KILL_AT": where, "OMP_NUM_THREADS": "1"}  # tiny model: 1 thread is fastest
    proc = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if line != "PAUSED\n":
            proc.kill()
            raise AssertionError(f"child did not reach {where}: {line!r} {proc.stderr.read()[-3000:]}")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
