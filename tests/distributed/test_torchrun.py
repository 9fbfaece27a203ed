"""`torchrun --nproc_per_node 2 -m fsclip ...` on CPU (gloo): data-parallel fit and eval match one process.

Each test starts real ranks through torchrun (Accelerate's process group, DDP over gloo) on the
shapes-world model, with one OpenMP thread per rank, and compares with the same command in this
process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fsclip
from fsclip.adapters import load_adapter
from fsclip.backends import load_model
from fsclip.cli import main
from fsclip.evaluation.shapes import write_novel
from fsclip.shapes import COLOURS, write_folder

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="this torch build has no gloo backend for CPU process groups"),
]

CLASSES = ("circle", "ring", "diamond")
# the learned update of 2 ranks vs 1 process, relative (L2 over all its tensors). Measured (8 steps,
# global batches of 5, 5, 2 over 12 images: parts of 3 and 2, weighted 1.2 and 0.8): 6e-6 (lora),
# 7e-5 (partial-ft). Weighting the parts equally instead gives 0.06 / 0.23; a global batch of 4 instead
# of 8 moves it by 0.26 / 0.33. Not 0: the ranks sum their gradients in another order, and Adam
# divides each gradient entry by its own running size, so entries whose true gradient is 0 or nearly
# (e.g. the key bias, which softmax ignores) turn rounding noise into steps of up to lr.
UPDATE_TOL = 1e-3
PROBA_TOL = 1e-4  # predicted probabilities on the test images; measured at most 1.7e-5 (partial-ft)


def torchrun(*argv, cwd: Path, cache: Path, code: int = 0) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m fsclip ARGV`, with this checkout first on the path;
    `code`: the exit status expected."""
    root = Path(fsclip.__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSCLIP_CACHE": str(cache),
           "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fsclip", *map(str, argv)]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == (code == 0), done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    classes = {s: [(c, s) for c in list(COLOURS)[:3]] for s in CLASSES}
    write_folder(root / "train", classes, 4, seed=0, size=64)  # 12 images
    write_folder(root / "val", classes, 2, seed=1, size=64)
    write_folder(root / "test", classes, 2, seed=2, size=64)
    return root


def _learned_update(folder: Path, base: dict[str, torch.Tensor]) -> torch.Tensor:
    """What training changed, flattened: LoRA's B matrices (they start at 0), or the fine-tuned backbone
    tensors minus the base model's."""
    tensors = load_file(folder / "adapter_model.safetensors")
    parts = [v for k, v in sorted(tensors.items()) if ".lora_B." in k]
    parts = parts or [v - base[k.removeprefix("model.")] for k, v in sorted(tensors.items()) if k.startswith("model.")]
    assert parts, sorted(tensors)
    return torch.cat([p.float().flatten() for p in parts])


@pytest.mark.parametrize("method, options", [
    ("lora", ["--option", "dropout=0"]),  # LoRA dropout would draw other masks on each rank
    ("partial-ft", []),  # DDP over backbone blocks and the head, unfrozen one block per epoch
])
def test_two_ranks_fit_what_one_process_fits_with_the_same_global_batch(method, options, folders, tmp_path, capsys):
    argv = [folders / "train", "--val", folders / "val", "--model", "shapes", "--device", "cpu", "--templates",
            "shapes", "--method", method, "--option", "iters=8", "--option", "batch_size=5", *options, "-q"]  # uneven parts
    (tmp_path / "ddp").mkdir()
    # no --overwrite: a second writer would find the folder there and fail the command
    done = torchrun("fit", *argv, "--out", tmp_path / "ddp" / "adapter", cwd=tmp_path, cache=tmp_path / "cache")
    assert done.stdout.count("saved ") == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert [p.name for p in (tmp_path / "ddp").iterdir()] == ["adapter"]  # no temp folder left beside it
    assert sorted(p.name for p in (tmp_path / "ddp" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "metrics.json"]

    assert main(["fit", *map(str, argv), "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert not torch.distributed.is_initialized()  # one process: no process group, no DDP

    base = {k: v.float() for k, v in load_model("shapes", device="cpu").model.state_dict().items()}
    one, ddp = _learned_update(tmp_path / "one", base), _learned_update(tmp_path / "ddp" / "adapter", base)
    assert one.norm() > 0
    assert (ddp - one).norm() / one.norm() < UPDATE_TOL
    test = sorted(str(p) for p in (folders / "test").rglob("*.png"))
    probs = [load_adapter(p, device="cpu").predict_proba(test) for p in (tmp_path / "one", tmp_path / "ddp" / "adapter")]
    assert (probs[0] - probs[1]).abs().max() < PROBA_TOL


def _comparable(record):
    """A result record without what differs between any two runs: when it was made, how long it took."""
    if isinstance(record, dict):
        return {k: _comparable(v) for k, v in record.items()
                if k not in ("created", "timing") and not k.endswith("seconds")}
    if isinstance(record, list):
        return [_comparable(v) for v in record]
    return record


def test_eval_fewshot_over_two_ranks_writes_the_result_files_of_one_process(tmp_path, capsys):
    write_novel(tmp_path / "data" / "shapes-novel", train=2, val=1, test=2, seed=0)
    argv = ["eval", "fewshot", "--dataset", "shapes-novel", "--model", "shapes", "--device", "cpu", "--root",
            tmp_path / "data", "--method", "linear-probe", "--method", "prototype", "--shots", "1", "2",
            "--seeds", "1", "-q"]
    done = torchrun(*argv, "--out", tmp_path / "ddp", cwd=tmp_path, cache=tmp_path / "cache")
    # the main process alone reports: each run once on stdout, the summary once on stderr
    assert done.stdout.count(": done: top-1") == 4 and done.stderr.count("4 run(s), 0 skipped") == 1, done
    assert main([*map(str, argv), "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()

    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len(names) == 4 and sorted(p.name for p in (tmp_path / "ddp").iterdir()) == names  # no temp files
    for name in names:
        one, ddp = (json.loads((tmp_path / d / name).read_text()) for d in ("one", "ddp"))
        assert _comparable(ddp) == _comparable(one), name


def test_training_batch_norm_statistics_is_refused_in_one_line(folders, tiny_timm_dir, tmp_path):
    # ranks would each estimate them on their part of the batch (torch's SyncBatchNorm is GPU-only)
    done = torchrun("fit", folders / "train", "--model", tiny_timm_dir, "--device", "cpu", "--method", "prototype",
                    "--compare-scratch", "--out", tmp_path / "a", "-q", cwd=tmp_path, cache=tmp_path / "cache", code=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("fsclip: error:")]
    assert len(errors) == 1 and "--compare-scratch trains the batch-norm statistics" in errors[0], done.stderr
    assert "exitcode  : 2" in done.stderr and not (tmp_path / "a").exists()
