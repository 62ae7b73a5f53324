import pytest

from optimum_rmtkd import RMTKDConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"estimator": "pca"}, "`estimator` must be one of 'paper', 'mp-median', 'gavish-donoho', 'kritchman-nadler', 'mppca', got 'pca'."),
        ({"quantile": 1.5}, r"`quantile` must be in \(0.0, 1.0\), got 1.5."),
        ({"quantile": 0.0}, r"`quantile` must be in \(0.0, 1.0\), got 0.0."),
        ({"alpha": 1.2}, r"`alpha` must be in \[0.0, 1.0\], got 1.2."),
        ({"sample_unit": "words"}, "`sample_unit` must be one of 'tokens', 'cls', 'mean', got 'words'."),
        ({"sites": ("ffn", "heads")}, "`sites` must be one of 'hidden', 'ffn', 'channels', got 'heads'."),
        ({"sites": ()}, "`sites` must name at least one site kind"),
        ({"output_format": "onnx"}, "`output_format` must be one of 'stock', 'per-layer', got 'onnx'."),
        ({"temperature": 0}, "`temperature` must be > 0, got 0."),
        ({"batch_size": 0}, "`batch_size` must be a positive integer, got 0."),
        ({"width_multiple": 2.5}, "`width_multiple` must be a positive integer, got 2.5."),
        ({"target_reduction": 1.0}, r"`target_reduction` must be in \(0.0, 1.0\), got 1.0."),
        ({"max_metric_drop": -0.1}, "`max_metric_drop` must be >= 0 or None, got -0.1."),
        ({"max_stages": 0}, "`max_stages` must be a positive integer or None, got 0."),
        ({"histogram_bins": 1}, "`histogram_bins` must be at least 2, got 1."),
        ({"on_metric_drop": "retry"}, "`on_metric_drop` must be one of 'stop', 'skip', got 'retry'."),
        ({"mixed_precision": "fp8"}, "`mixed_precision` must be one of 'no', 'fp16', 'bf16', got 'fp8'."),
    ],
)
def test_bad_values_give_their_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RMTKDConfig(**kwargs)


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
