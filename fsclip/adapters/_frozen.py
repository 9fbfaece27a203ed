"""Shared base of the methods that fit a head on frozen, cached image features."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from fsclip.adapters._budget import Budget
from fsclip.adapters._features import FeatureData
from fsclip.adapters.base import Adapter
from fsclip.adapters.config import AdapterConfig
from fsclip.backends import Backend
from fsclip.data import LabeledImages

__all__ = ["FeatureAdapter"]


class FeatureAdapter(Adapter):
    """Encodes the training images once (feature cache), then fits on the features alone."""

    frozen_backbone = True

    @classmethod
    def fit(
        cls, backend: Backend, train: LabeledImages, val: LabeledImages, config: AdapterConfig, progress: bool = False,
        budget: Budget | None = None,
    ) -> FeatureAdapter:
        data = FeatureData.build(backend, train, config.templates, progress=progress)
        return cls.fit_features(backend, train.classes, data, config)

    @classmethod
    @abstractmethod
    def fit_features(
        cls, backend: Backend, classes: Sequence[str], data: FeatureData, config: AdapterConfig
    ) -> FeatureAdapter:
        """Fit from features alone: no image is decoded or encoded here (benchmarks call this directly)."""
