"""Every command's `--runtime` path end to end on the shapes model: same answers as torch, one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from fsclip.cli import main
from fsclip.shapes import write_folder

CLASSES = {"red circle": [("red", "circle")], "blue star": [("blue", "star")], "green square": [("green", "square")]}
LABELS = ",".join(CLASSES)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    write_folder(root, CLASSES, 8, seed=3, size=80, fmt="jpg")
    return root


@pytest.fixture(autouse=True)
def _gated(shapes_int8, shapes_onnx):
    """Both ONNX runtimes of the shapes model are exported and gated once per session, not per command."""


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _labels(out: str) -> dict[str, str]:
    return {r["path"]: r["label"] for r in map(json.loads, out.splitlines())}


def test_classify(photos, capsys):
    common = ("classify", photos, "--model", "shapes", "--labels", LABELS, "--templates", "shapes", "--format", "json",
              "-q")
    code, out, _ = _run(capsys, *common, "--runtime", "torch")
    assert code == 0
    torch_labels = _labels(out)
    for runtime in ("onnx", "onnx-int8"):
        code, out, _ = _run(capsys, *common, "--runtime", runtime)
        assert code == 0 and _labels(out) == torch_labels, runtime
    # and they are right: the folder names are the classes
    assert all(label.replace(" ", "_") in path for path, label in torch_labels.items())


def test_index_build_update_info_and_search(photos, tmp_path, capsys):
    shutil.copytree(photos, tmp_path / "photos")
    photos, idx = tmp_path / "photos", tmp_path / "p.idx"
    code, out, _ = _run(capsys, "index", "build", photos, "--index", idx, "--model", "shapes", "--runtime", "onnx-int8",
                        "--format", "json", "-q")
    assert code == 0 and json.loads(out)["embedded"] == 24
    code, out, _ = _run(capsys, "index", "info", idx, "--format", "json")
    assert json.loads(out)["runtime"] == "onnx-int8"
    code, out, _ = _run(capsys, "index", "info", idx)
    assert "runtime:          onnx-int8" in out

    hits = {}
    for runtime in ("onnx-int8", "onnx", "torch"):  # any runtime of the same weights may query it
        code, out, _ = _run(capsys, "search", idx, "a photo of a blue star.", "-k", "8", "--format", "json",
                            "--runtime", runtime)
        assert code == 0
        hits[runtime] = {json.loads(line)["path"] for line in out.splitlines()}
    assert all("blue_star" in p for p in hits["torch"]) and hits["onnx-int8"] == hits["onnx"] == hits["torch"]

    write_folder(photos / "more", {"red circle": [("red", "circle")]}, 2, seed=9, size=80, fmt="jpg")
    code, out, _ = _run(capsys, "index", "update", idx, "--runtime", "torch", "--format", "json", "-q")
    assert code == 0 and json.loads(out)["embedded"] == 2
    code, out, _ = _run(capsys, "index", "info", idx, "--format", "json")
    assert json.loads(out)["runtime"] == "onnx-int8,torch"  # what its vectors came from


def test_serve_app_answers_with_an_onnx_runtime(photos, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from fsclip.search import ImageIndex
    from fsclip.search.service import build_app

    with ImageIndex.create(tmp_path / "s.idx", "shapes", runtime="onnx-int8") as index:
        index.add([photos])
    index = ImageIndex.open(tmp_path / "s.idx", runtime="onnx-int8")
    assert index.backend.runtime == "onnx-int8"
    resp = TestClient(build_app(index), base_url="http://127.0.0.1:8000").get("/api/search", params={"q": "a photo of a green square.", "k": 5})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 5 and all("green_square" in r["path"] for r in results)


@pytest.fixture(scope="module")
def tip_adapter(photos, tmp_path_factory):
    """Fitted on int8 features: an adapter records the weights, not the runtime, so torch can use it too."""
    out = tmp_path_factory.mktemp("adapters") / "tip"
    assert main(["fit", str(photos), "--model", "shapes", "--method", "tip-adapter", "--out", str(out),
                 "--templates", "shapes", "--runtime", "onnx-int8", "-q"]) == 0
    return out


def test_predict_with_a_frozen_feature_adapter(photos, tip_adapter, capsys):
    common = ("predict", photos, "--adapter", tip_adapter, "--format", "json", "-q")
    code, out, _ = _run(capsys, *common)
    assert code == 0
    torch_labels = _labels(out)
    code, out, _ = _run(capsys, *common, "--runtime", "onnx-int8")
    assert code == 0 and _labels(out) == torch_labels


def test_tower_training_methods_refuse_onnx_in_one_line(photos, tmp_path, capsys):
    for method in ("lora", "coop"):  # coop's image features are frozen, but it learns through the text tower
        code, _, err = _run(capsys, "fit", photos, "--model", "shapes", "--method", method, "--out",
                            tmp_path / "x", "--runtime", "onnx", "-q")
        assert code == 2 and err.count("\n") == 1 and f"--method {method} trains the towers" in err
    lora = tmp_path / "lora"
    assert main(["fit", str(photos), "--model", "shapes", "--method", "lora", "--out", str(lora), "--iters", "1",
                 "--batch-size", "4", "--templates", "shapes", "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "predict", photos, "--adapter", lora, "--runtime", "onnx-int8", "-q")
    assert code == 2 and err.count("\n") == 1
    assert "lora adapter trains the towers" in err and "--runtime torch" in err and "--merge" in err


def test_eval_zeroshot(tmp_path, capsys):
    from fsclip.evaluation.shapes import write_compositional

    write_compositional(tmp_path / "data" / "shapes-compositional", per_class=2, seed=0)
    top1 = {}
    for runtime in ("torch", "onnx-int8"):
        out = tmp_path / runtime
        code, _, _ = _run(capsys, "eval", "zeroshot", "--dataset", "shapes-compositional", "--root", tmp_path / "data",
                          "--model", "shapes", "--device", "cpu", "--out", out, "--runtime", runtime, "-q")
        assert code == 0
        (result,) = out.glob("*.json")
        record = json.loads(result.read_text())
        assert record["model"]["runtime"] == runtime
        top1[runtime] = record["metrics"]["top1"]
    # measured: identical top-1 on these 96 images (the int8 gate measured 100% agreement on 512 renders)
    assert abs(top1["onnx-int8"] - top1["torch"]) <= 1 / 96
