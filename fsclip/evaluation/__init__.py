"""Evaluation harness: datasets, the CoOp few-shot protocol, metrics, result files and reports.

    >>> from fsclip.evaluation import load_dataset, plan_runs, run_all, build_report
    >>> specs = plan_runs("fewshot", "shapes", "shapes-novel", ["tip-adapter"], [1, 2, 4], [1, 2, 3])
    >>> run_all(specs, root="data", out_dir="results")        # one JSON per run
    >>> build_report(load_results(["results"]), "report/")    # Markdown + CSV tables, PNG plots

Datasets (`list_datasets()`): the 11 of CoOp's few-shot protocol read from CoOp's folder layout,
any ImageFolder, Hugging Face `datasets` folders, Flickr30k/COCO-style caption files, and the
synthetic shapes-world sets. Nothing is downloaded.
"""

from __future__ import annotations

from fsclip.evaluation import captions as _captions  # noqa: F401  (registers)
from fsclip.evaluation import coop as _coop  # noqa: F401  (registers)
from fsclip.evaluation import hf_datasets as _hf_datasets  # noqa: F401  (registers)
from fsclip.evaluation import imagefolder as _imagefolder  # noqa: F401  (registers)
from fsclip.evaluation import shapes as _shapes  # noqa: F401  (registers)
from fsclip.evaluation.coop import COOP_DATASETS
from fsclip.evaluation.datasets import (
    CaptionData,
    ClassificationData,
    DatasetSpec,
    get_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
)
from fsclip.evaluation.metrics import classification_metrics, retrieval_metrics
from fsclip.evaluation.protocol import RunOutcome, few_shot_split, plan_runs, run_all, run_one
from fsclip.evaluation.report import Report, build_report
from fsclip.evaluation.results import RunSpec, load_results, write_result

__all__ = [
    "COOP_DATASETS",
    "CaptionData",
    "ClassificationData",
    "DatasetSpec",
    "Report",
    "RunOutcome",
    "RunSpec",
    "build_report",
    "classification_metrics",
    "few_shot_split",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "load_results",
    "plan_runs",
    "register_dataset",
    "retrieval_metrics",
    "run_all",
    "run_one",
    "write_result",
]
