import dataclasses
import json
import math

import numpy as np
import pytest

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.configuration import _NUMBER_FIELDS, PRESETS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"estimator": "pca"}, "`estimator` must be one of 'paper', 'mp-median', 'gavish-donoho', 'kritchman-nadler', 'mppca', got 'pca'."),
        ({"quantile": 1.5}, r"`quantile` must be in \(0.0, 1.0\), got 1.5."),
        ({"quantile": 0.0}, r"`quantile` must be in \(0.0, 1.0\), got 0.0."),
        ({"alpha": 1.2}, r"`alpha` must be in \[0.0, 1.0\], got 1.2."),
        ({"sample_unit": "words"}, "`sample_unit` must be one of 'tokens', 'cls', 'mean', got 'words'."),
        ({"sites": ("ffn", "attention")}, "`sites` must be one of 'hidden', 'ffn', 'heads', 'channels', got 'attention'."),
        ({"sites": ()}, "`sites` must name at least one site kind"),
        ({"output_format": "onnx"}, "`output_format` must be one of 'stock', 'per-layer', got 'onnx'."),
        ({"temperature": 0}, r"`temperature` must be > 0, got 0.0."),
        ({"batch_size": 0}, "`batch_size` must be a positive integer, got 0."),
        ({"target_reduction": 1.0}, r"`target_reduction` must be in \(0.0, 1.0\), got 1.0."),
        ({"max_metric_drop": -0.1}, "`max_metric_drop` must be >= 0 or None, got -0.1."),
        ({"max_metric_drop": "off"}, "`max_metric_drop` must be a number, 'auto' or None, got str 'off'."),
        ({"max_stages": 0}, "`max_stages` must be a positive integer or None, got 0."),
        ({"histogram_bins": 1}, "`histogram_bins` must be at least 2, got 1."),
        ({"on_metric_drop": "retry"}, "`on_metric_drop` must be one of 'stop', 'skip', got 'retry'."),
        ({"mixed_precision": "fp8"}, "`mixed_precision` must be one of 'no', 'fp16', 'bf16', got 'fp8'."),
        ({"seed": -1}, r"`seed` must be an integer in \[0, 2\*\*32 - 1\], got -1."),
        ({"seed": 2**32}, r"`seed` must be an integer in \[0, 2\*\*32 - 1\], got 4294967296."),
        # NaN compares false with every bound: it used to pass and switch the stop rules off.
        ({"target_reduction": float("nan")}, "`target_reduction` must be a finite number or None, got nan."),
        ({"max_metric_drop": float("nan")}, "`max_metric_drop` must be a finite number or None, got nan."),
        ({"distillation_epochs": float("inf")}, "`distillation_epochs` must be a finite number, got inf."),
        ({"learning_rate": -float("inf")}, "`learning_rate` must be a finite number, got -inf."),
        ({"learning_rate": "fast"}, "`learning_rate` must be a number or 'auto', got str 'fast'."),
        ({"learning_rate": 0}, r"`learning_rate` must be > 0, got 0.0."),
    ],
)
def test_bad_values_give_their_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMTKDConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": "a"}, "`seed` must be an integer, got str 'a'."),
        ({"batch_size": "32"}, "`batch_size` must be an integer, got str '32'; write it without quotes."),
        ({"batch_size": True}, "`batch_size` must be an integer, got bool True."),
        ({"width_multiple": 2.5}, "`width_multiple` must be an integer, got float 2.5."),
        ({"max_stages": 2.0}, "`max_stages` must be an integer or None, got float 2.0."),
        ({"quantile": "0.5"}, "`quantile` must be a number, got str '0.5'; write it without quotes."),
        ({"alpha": False}, "`alpha` must be a number, got bool False."),
        ({"target_reduction": [0.3]}, r"`target_reduction` must be a number or None, got list \[0.3\]."),
        ({"centered": "yes"}, "`centered` must be a bool \\(true or false\\), got str 'yes'"),
        ({"layerwise_calibration": 1}, "`layerwise_calibration` must be a bool \\(true or false\\), got int 1"),
        ({"sites": 3}, "`sites` must be a list or tuple of site kinds from 'hidden', 'ffn', 'heads', 'channels', got int "
                       "3."),
    ],
)
def test_wrong_types_give_their_message(kwargs, message):
    with pytest.raises(TypeError, match=message):
        RMTKDConfig(**kwargs)


@pytest.mark.parametrize("name", sorted(_NUMBER_FIELDS))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_every_number_must_be_finite(name, value):
    with pytest.raises((ValueError, TypeError), match=rf"`{name}` must be "):
        RMTKDConfig(**{name: value})


def test_every_field_is_checked():
    # A new field must be a number (checked from its annotation), or one of the fields checked by name.
    checked_by_name = {"estimator", "sample_unit", "sites", "head_reduction", "output_format", "mixed_precision",
                       "on_metric_drop", "centered", "layerwise_calibration", "channel_selection", "hidden_cut",
                       "target_mode", "max_metric_drop", "learning_rate"}
    assert {field.name for field in dataclasses.fields(RMTKDConfig)} == set(_NUMBER_FIELDS) | checked_by_name


def test_numbers_are_stored_as_plain_python_numbers():
    config = RMTKDConfig(batch_size=np.int64(16), quantile=np.float32(0.25), temperature=2, seed=np.uint32(7))
    assert (config.batch_size, config.quantile, config.temperature, config.seed) == (16, 0.25, 2.0, 7)
    assert type(config.batch_size) is int and type(config.quantile) is float and type(config.temperature) is float
    assert RMTKDConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_from_dict_needs_a_dict():
    with pytest.raises(TypeError, match=r"An RMTKDConfig must be built from a dict \(a JSON object\) of its fields, "
                                        r"got list."):
        RMTKDConfig.from_dict([["batch_size", 8]])


def test_defaults_are_the_benchmarked_recipe():
    config = RMTKDConfig()
    assert (config.estimator, config.sites, config.on_metric_drop) == ("mp-median", ("ffn", "hidden"), "skip")
    # The docstring says what they are and that the paper's recipe is one call away.
    doc = " ".join(RMTKDConfig.__doc__.split())
    assert '`mp-median` estimator, the FFN sites before the hidden width (`sites=("ffn", "hidden")`)' in doc
    assert '`on_metric_drop="skip"`' in doc and 'RMTKDConfig.preset("paper")' in doc


def test_paper_preset_and_its_overrides():
    paper = RMTKDConfig.preset("paper")
    assert (paper.estimator, paper.sites, paper.on_metric_drop) == ("paper", ("hidden", "ffn"), "stop")
    # Everything else keeps its default.
    defaults = RMTKDConfig()
    assert dataclasses.replace(paper, **{name: getattr(defaults, name) for name in PRESETS["paper"]}) == defaults
    tuned = RMTKDConfig.preset("paper", quantile=0.7, on_metric_drop="skip")
    assert (tuned.estimator, tuned.quantile, tuned.on_metric_drop) == ("paper", 0.7, "skip")
    with pytest.raises(ValueError, match="`preset` must be one of 'paper', got 'fast'."):
        RMTKDConfig.preset("fast")


def test_json_round_trip(tmp_path):
    config = RMTKDConfig(estimator="gavish-donoho", sites=("ffn",), target_reduction=0.5, max_stages=3)
    config.to_json_file(tmp_path)
    assert (tmp_path / "rmtkd_config.json").is_file()
    again = RMTKDConfig.from_json_file(tmp_path / "rmtkd_config.json")
    assert again == config
    assert RMTKDConfig.from_dict(config.to_dict()) == config


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="Unknown RMTKDConfig field\\(s\\) 'tau'"):
        RMTKDConfig.from_dict({"tau": 0.5})


def test_estimator_kwargs_match_fit_spectrum():
    import inspect

    from optimum_rmtkd.rmt import fit_spectrum

    params = inspect.signature(fit_spectrum).parameters
    assert set(RMTKDConfig().estimator_kwargs()) <= set(params)
