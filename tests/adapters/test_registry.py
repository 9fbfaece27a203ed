"""One registry, derived listings, frozen validated configs, one-line errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fsclip.adapters import fit, get_adapter, list_adapters, list_methods, register_adapter
from fsclip.adapters.config import AdapterConfig
from fsclip.errors import UsageError

METHODS = ["clap", "coop", "full-ft", "linear-probe", "lora", "partial-ft", "prolip", "prototype", "scratch",
           "tip-adapter", "tip-adapter-f"]


def test_list_adapters_is_derived_from_the_registry():
    assert list_adapters() == METHODS
    assert list_methods() == ["auto", *METHODS]
    assert all(get_adapter(m).name == m for m in METHODS)


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(get_adapter("lora"))
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(type("Auto", (), {"name": "auto"}))


def test_unknown_method_lists_the_valid_ones(tiny_openclip, small_task):
    with pytest.raises(UsageError) as err:
        fit(tiny_openclip, small_task.pool, "lorra", val=small_task.val)
    msg = str(err.value)
    assert "'lorra'" in msg and f"choose one of: {', '.join(['auto', *METHODS])}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("method", METHODS)
def test_configs_are_frozen_and_round_trip_through_json(method):
    cls = get_adapter(method).config_class
    cfg = cls(templates=["a photo of a {}."], seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 4
    again = cls.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.templates, tuple)


@pytest.mark.parametrize(
    ("method", "field", "value"),
    [("lora", "rank", 0), ("lora", "dropout", 1.5), ("lora", "towers", "audio"), ("lora", "lr", -1.0),
     ("partial-ft", "blocks", 0), ("full-ft", "layer_decay", 2.0), ("tip-adapter", "alpha_grid", ()),
     ("tip-adapter-f", "views", -1), ("linear-probe", "c_grid", (0.0,)), ("linear-probe", "seed", -1),
     ("linear-probe", "folds", 1), ("clap", "epochs", 0), ("clap", "crop_scale", 0.0), ("prolip", "penalty", -1.0),
     ("coop", "n_ctx", 0), ("coop", "views", 0)],
)
def test_invalid_values_name_field_and_value(method, field, value):
    cls = get_adapter(method).config_class
    with pytest.raises(ValueError) as err:
        cls(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_epochs_and_iters_replace_each_other():
    cfg = get_adapter("full-ft").config_class().with_options(epochs=3)
    assert cfg.epochs == 3 and cfg.iters is None
    assert cfg.with_options(iters=7).epochs is None
    with pytest.raises(UsageError, match="not both"):
        cfg.with_options(iters=7, epochs=2)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(UsageError, match="choose from: .*c_grid"):
        get_adapter("linear-probe").config_class().with_options(iters=3)
    assert isinstance(get_adapter("lora").config_class(), AdapterConfig)
