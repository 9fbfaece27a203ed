"""The bundled image-only backbone (shapes-resnet) on the 9-shape task: accuracy of the methods, the advisor
without a text tower, and the evaluation harness (few-shot without a K=0 column, zero-shot refused).

Thresholds come from measurements on 5 renders of the task (render r: seeds 100r, 100r+1, 100r+2, 64 px;
4 training, 2 validation and 10 test images per class; the tests use render 0), with margin below the
lowest. Chance is 1/9 = 0.111.
"""

from __future__ import annotations

import json

import pytest
import torch

from fsclip.adapters import Budget, advise, fit
from fsclip.adapters._costs import Costs
from fsclip.backends import load_model
from fsclip.cli import main
from fsclip.data import load_image_folder, sample_shots
from fsclip.shapes import BASE_SHAPES, COLOURS, write_folder

NOT_MEASURED = {"zero-shot accuracy (training)": "not measured: the model has no text tower",
                "feature statistics vs pretraining": "not measured: the model card gives no pretraining feature "
                                                     "statistics"}


@pytest.fixture(scope="module")
def resnet():
    return load_model("shapes-resnet", device="cpu")


def _case(method, shots, least, **options):
    return pytest.param(method, shots, options, least, id=f"{method}-{shots}shot")


@pytest.mark.parametrize(("method", "shots", "options", "least"), [
    _case("prototype", 1, 0.55),  # measured 0.700-0.844 over the 5 renders
    _case("linear-probe", 1, 0.55),  # 0.689-0.856
    _case("prototype", 4, 0.72),  # 0.833-0.933
    _case("linear-probe", 4, 0.78),  # 0.889-0.944
    _case("partial-ft", 4, 0.78, iters=20),  # 0.889-0.944
    _case("lora", 4, 0.78, iters=20),  # 0.889-0.944 (LoRA on the convolutions)
])
def test_test_accuracy_on_the_novel_shape_task(method, shots, options, least, resnet, novel_task):
    train = novel_task.train if shots == 4 else sample_shots(novel_task.train, shots, seed=0)
    adapter = fit(resnet, train, method, val=novel_task.val, **options)
    probs = adapter.predict_proba(novel_task.test.paths)
    accuracy = float((probs.argmax(1) == torch.tensor(novel_task.test.targets)).float().mean())
    assert accuracy >= least, accuracy


def test_advisor_says_what_it_could_not_measure_and_puts_a_head_on_separable_features(resnet, tmp_path):
    write_folder(tmp_path, {s: [(c, s) for c in COLOURS] for s in BASE_SHAPES}, 4, seed=0, size=64)
    advice = advise(resnet, load_image_folder(tmp_path))  # the 6 shapes it was pretrained on
    m = advice.measurements
    assert {k: m[k] for k in NOT_MEASURED} == NOT_MEASURED
    # frozen probe measured 1.000 in cross-validation on all 5 renders: above the 0.95 of the strategy matrix
    assert m["frozen probe accuracy (cross-validated)"] >= 0.95 and m["domain"].startswith("similar")
    assert {"prototype accuracy (cross-validated)", "linear-probe accuracy (cross-validated)"} <= set(m)
    assert advice.method in ("prototype", "linear-probe") and "cross-validation" in advice.reason
    assert "zero-shot" not in advice.reason.split(";")[-1]  # no text tower: the simplest head, not zero-shot


def test_advisor_fine_tunes_where_frozen_features_do_not_separate(resnet, novel_task):
    advice = advise(resnet, novel_task.train)
    # with 3 shapes it never saw: frozen probe measured 0.778-0.917 in cross-validation over the 5 renders
    assert advice.measurements["frozen probe accuracy (cross-validated)"] < 0.95
    assert advice.measurements["domain"] == "different"
    assert advice.method == "partial-ft" and "partial fine-tuning" in advice.reason


def test_advisor_at_one_image_per_class_is_training_free(resnet, novel_task):
    advice = advise(resnet, sample_shots(novel_task.train, 1, seed=0))
    assert advice.method == "prototype"
    assert advice.measurements["frozen probe accuracy (cross-validated)"].startswith("not measured: one image")


def test_advisor_is_compute_aware_without_a_text_tower(resnet, novel_task):
    # a slow device (1 s an image): partial-ft's and LoRA's default schedules cannot fit 10 minutes
    slow = Costs(images=36, shots=4, classes=9, image_seconds=1.0, text_seconds=0.0)
    advice = advise(resnet, novel_task.train, budget=Budget(600), costs=slow)
    assert advice.method == "linear-probe"
    assert "partial-ft's default schedule" in advice.compute and advice.compute.endswith("chose linear-probe instead")


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    from fsclip.evaluation.shapes import write_novel

    root = tmp_path_factory.mktemp("eval-data")
    write_novel(root / "shapes-novel", train=4, val=2, test=4, seed=0)
    return root


def _eval(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_fewshot_on_an_image_only_model_and_side_by_side(eval_root, tmp_path, capsys):
    common = ["--dataset", "shapes-novel", "--root", eval_root, "--out", tmp_path, "--device", "cpu", "-q",
              "--method", "prototype", "--shots", "1", "2", "--seeds", "1"]
    for model in ("shapes-resnet", "shapes"):
        code, _, err = _eval(capsys, "fewshot", "--model", model, *common)
        assert code == 0, err
    record = json.loads((tmp_path / "fewshot__shapes-novel__shapes-resnet__prototype__k2__s1.json").read_text())
    assert record["metrics"]["top1"] > 1 / 9 and not any("zero" in k for k in record["metrics"])
    code, report, err = _eval(capsys, "report", tmp_path)
    assert code == 0, err
    own = report[report.index("### Few-shot, shapes-novel, shapes-resnet: top-1"):]
    assert own.splitlines()[2] == "| method | K=1 | K=2 |"  # no K=0 column: omitted, not zero
    side = report[report.index("### Few-shot, shapes-novel: backbones side by side"):].splitlines()
    assert side[2] == "| method | K | shapes | shapes-resnet |"
    assert [row.split(" | ")[:2] for row in side[4:6]] == [["| prototype", "1"], ["| prototype", "2"]]


def test_eval_zeroshot_on_an_image_only_model_is_one_line(eval_root, tmp_path, capsys):
    code, out, err = _eval(capsys, "zeroshot", "--dataset", "shapes-novel", "--model", "shapes-resnet", "--root",
                           eval_root, "--out", tmp_path / "r", "--device", "cpu", "-q")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "has no text tower" in err and "fsclip eval fewshot" in err
    assert not list(tmp_path.rglob("*.json"))


def test_eval_fewshot_without_a_method_runs_the_training_free_baseline_the_model_can_run(eval_root, tmp_path, capsys):
    """Tip-Adapter needs a text tower; on an image-only model the default is the prototype classifier."""
    code, _, err = _eval(capsys, "fewshot", "--dataset", "shapes-novel", "--model", "shapes-resnet", "--root",
                         eval_root, "--out", tmp_path, "--device", "cpu", "-q", "--shots", "1", "--seeds", "1")
    assert code == 0, err
    assert [p.name for p in tmp_path.glob("*.json")] == ["fewshot__shapes-novel__shapes-resnet__prototype__k1__s1.json"]
