"""ResNet adapter: site tables, exactness at full width, reloadable narrower models (stock and per-layer), the image
task's preprocessing, a full compression on real digits, and the ONNX export of the result."""
import dataclasses
import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import AutoImageProcessor, AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

import optimum_rmtkd  # noqa: F401  (registers the per-layer model types)
from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
from optimum_rmtkd.adapters import CapturePoint, get_adapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.modeling.per_layer import as_output_format
from optimum_rmtkd.saving import save_compressed_model

from _models import NUM_LABELS, save_tiny_resnet

STAGE0, STAGE1 = "resnet.encoder.stages.0", "resnet.encoder.stages.1"
BLOCK0, BLOCK1 = f"{STAGE0}.layers.0", f"{STAGE1}.layers.0"


def _randomise_batch_norms(model):
    """Fresh BatchNorms are identities (γ=1, β=0, mean 0, var 1) and would hide a channel sliced from the wrong
    parameter or statistic; random ones do not."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=g))
                module.bias.copy_(0.2 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


@pytest.fixture(scope="module", params=["basic", "bottleneck"])
def resnet_dir(request, tmp_path_factory):
    path = save_tiny_resnet(tmp_path_factory.mktemp(request.param), request.param)
    model = _randomise_batch_norms(AutoModelForImageClassification.from_pretrained(path))
    model.save_pretrained(path)
    return path


def _images(n=6, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _load(path):
    return AutoModelForImageClassification.from_pretrained(path).eval()


def _reduce(model, widths_for, output_format="stock"):
    """Calibrate on random images, cut every site to `widths_for(site)` and, as the compressor does, turn the result
    into the class its output format saves."""
    adapter = get_adapter(model)
    sites = adapter.sites(model)
    stats = collect_statistics(model, [{"pixel_values": _images(4, s)} for s in range(3)],
                               adapter.required_captures(sites))
    widths = {s.name: widths_for(s) for s in sites}
    config = RMTKDConfig(sites=("channels",), output_format=output_format)
    return as_output_format(adapter.reduce(model, sites, widths, stats, config), output_format)


def _logits(model, pixel_values):
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


# --- sites ------------------------------------------------------------------------------------------------------
def test_site_table_basic(tmp_path):
    # Basic tiny model: stem 12 = stage 0 width 12 at stride 1, so stage 0 adds the stem output unprojected.
    model = _load(save_tiny_resnet(tmp_path, "basic"))
    sites = get_adapter(model).sites(model)
    # Deepest stage first, each stage's residual width before its blocks' inner widths.
    assert [(s.name, s.kind, s.dim, s.layer, s.config_field) for s in sites] == [
        (STAGE1, "channels", 20, None, "hidden_sizes[1]"),
        (f"{BLOCK1}.layer.0", "channels", 20, 1, "per_layer_config[1].inner_sizes[0]"),
        (STAGE0, "channels", 12, None, "hidden_sizes[0], embedding_size"),
        (f"{BLOCK0}.layer.0", "channels", 12, 0, "per_layer_config[0].inner_sizes[0]"),
    ]
    stage1, stage0, inner0 = sites[0], sites[2], sites[3]
    assert stage0.writers == (f"{BLOCK0}.layer.1.convolution", "resnet.embedder.embedder.convolution")
    assert stage0.readers == (f"{BLOCK0}.layer.0.convolution", f"{BLOCK1}.layer.0.convolution",
                              f"{BLOCK1}.shortcut.convolution")
    assert [p.key for p in stage0.captures] == ["resnet.embedder:output", f"{BLOCK0}:output"]
    assert stage1.writers == (f"{BLOCK1}.layer.1.convolution", f"{BLOCK1}.shortcut.convolution")
    assert stage1.readers == ("classifier.1",)
    assert stage1.reader_inputs == (CapturePoint("classifier.1", side="input", layout="vector"),)
    assert stage0.reader_inputs[0] == CapturePoint(f"{BLOCK0}.layer.0.convolution", side="input", layout="image")
    assert inner0.writers == (f"{BLOCK0}.layer.0.convolution",) and inner0.readers == (f"{BLOCK0}.layer.1.convolution",)
    assert {p.layout for s in sites for p in s.captures} == {"image"}
    for site in sites:
        assert site.path == "nonlinear"
        for path in site.writers + site.readers + site.norms:
            model.get_submodule(path)  # every table entry names a real module


def test_site_table_bottleneck(tmp_path):
    # Bottleneck tiny model: stem 12 != stage 0 width 16, so stage 0 projects and the stem is a site of its own.
    model = _load(save_tiny_resnet(tmp_path, "bottleneck"))
    sites = get_adapter(model).sites(model)
    assert [(s.name, s.dim, s.layer, s.config_field) for s in sites] == [
        (STAGE1, 28, None, "hidden_sizes[1]"),
        (f"{BLOCK1}.layer.0", 7, 1, "per_layer_config[1].inner_sizes[0]"),
        (f"{BLOCK1}.layer.1", 7, 1, "per_layer_config[1].inner_sizes[1]"),
        (STAGE0, 16, None, "hidden_sizes[0]"),
        (f"{BLOCK0}.layer.0", 4, 0, "per_layer_config[0].inner_sizes[0]"),
        (f"{BLOCK0}.layer.1", 4, 0, "per_layer_config[0].inner_sizes[1]"),
        ("resnet.embedder", 12, None, "embedding_size"),
    ]
    assert sites[6].readers == (f"{BLOCK0}.layer.0.convolution", f"{BLOCK0}.shortcut.convolution")
    assert sites[3].writers == (f"{BLOCK0}.layer.2.convolution", f"{BLOCK0}.shortcut.convolution")
    assert sites[5].readers == (f"{BLOCK0}.layer.2.convolution",)  # the 1×1 expand reads the second inner width


def test_stock_groups_are_one_per_config_field(resnet_dir):
    model = _load(resnet_dir)
    adapter = get_adapter(model)
    groups = [[s.name for s in group] for group in adapter.stock_groups(model, adapter.sites(model))]
    stem = [["resnet.embedder"]] if model.config.layer_type == "bottleneck" else []
    inner = (0,) if model.config.layer_type == "basic" else (0, 1)
    assert groups == [
        [STAGE1] + [f"{BLOCK1}.layer.{j}" for j in inner],
        [STAGE0] + [f"{BLOCK0}.layer.{j}" for j in inner],
    ] + stem


# --- exactness --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("output_format", ["stock", "per-layer"])
def test_full_width_reduction_is_exact(resnet_dir, output_format):
    reference = _load(resnet_dir)
    reduced = _reduce(_load(resnet_dir), lambda s: s.dim, output_format)
    assert not reduced.training
    # Slicing with every channel kept copies weights; the refit returns them unchanged: only float32 round-off.
    torch.testing.assert_close(_logits(reduced, _images()), _logits(reference, _images()), rtol=1e-5, atol=1e-5)


# --- narrower models --------------------------------------------------------------------------------------------
def _stock_widths(layer_type):
    """Per stage (16 → 12, 28 → 20 bottleneck; 12 → 8, 20 → 12 basic) with the stock inner widths they imply."""
    if layer_type == "bottleneck":
        return {"resnet.embedder": 8, STAGE0: 12, STAGE1: 20}, {0: 3, 1: 5}
    return {STAGE0: 8, STAGE1: 12}, {0: 8, 1: 12}


def test_narrower_model_has_exact_widths_and_reloads_stock(resnet_dir, tmp_path):
    model = _load(resnet_dir)
    layer_type = model.config.layer_type
    stage_widths, inner = _stock_widths(layer_type)
    reduced = _reduce(model, lambda s: stage_widths.get(s.name, inner[0 if s.name.startswith(BLOCK0) else 1]))
    hidden = [stage_widths[STAGE0], stage_widths[STAGE1]]
    assert reduced.config.hidden_sizes == hidden
    assert reduced.config.embedding_size == stage_widths.get("resnet.embedder", stage_widths[STAGE0])
    save_compressed_model(reduced, None, tmp_path, "stock")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "resnet" and "auto_map" not in saved
    reloaded = _load(tmp_path)
    assert type(reloaded) is ResNetForImageClassification
    assert reloaded.classifier[1].in_features == hidden[1]
    assert reloaded.get_submodule(f"{BLOCK1}.shortcut.convolution").out_channels == hidden[1]
    assert reloaded.get_submodule(f"{BLOCK1}.layer.0.convolution").in_channels == hidden[0]
    assert reloaded.get_submodule(f"{BLOCK0}.layer.0.convolution").out_channels == inner[0]
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in reduced.parameters())
    torch.testing.assert_close(_logits(reloaded, _images()), _logits(reduced, _images()))


def test_per_layer_widths_reload_as_registered_type(resnet_dir, tmp_path):
    model = _load(resnet_dir)
    bottleneck = model.config.layer_type == "bottleneck"
    # Inner widths differ per block and from what `hidden_sizes` implies; stage 1 is cut below block 1's inner width.
    if bottleneck:
        inner = {f"{BLOCK0}.layer.0": 3, f"{BLOCK0}.layer.1": 2, f"{BLOCK1}.layer.0": 5, f"{BLOCK1}.layer.1": 6}
    else:
        inner = {f"{BLOCK0}.layer.0": 3, f"{BLOCK1}.layer.0": 15}
    reduced = _reduce(model, lambda s: inner.get(s.name, 10 if s.name == STAGE1 else s.dim), "per-layer")
    assert type(reduced).__name__ == "RMTKDResNetForImageClassification"
    save_compressed_model(reduced, None, tmp_path, "per-layer")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "rmtkd_resnet"
    assert saved["auto_map"]["AutoModelForImageClassification"] == "modeling_rmtkd.RMTKDResNetForImageClassification"
    expected = ({"0": {"inner_sizes": [3, 2]}, "1": {"inner_sizes": [5, 6]}} if bottleneck
                else {"0": {"inner_sizes": [3]}, "1": {"inner_sizes": [15]}})
    assert saved["per_layer_config"] == expected
    assert saved["hidden_sizes"][1] == 10
    reloaded = _load(tmp_path)
    assert type(reloaded).__name__ == "RMTKDResNetForImageClassification"
    for name, width in inner.items():
        assert reloaded.get_submodule(f"{name}.convolution").out_channels == width
        assert reloaded.get_submodule(f"{name}.normalization").num_features == width
    assert reloaded.classifier[1].in_features == 10
    torch.testing.assert_close(_logits(reloaded, _images()), _logits(reduced, _images()))


def test_per_layer_cut_edits_the_config_and_leaves_the_class(tmp_path):
    # The adapter only edits modules and the config; turning the model into `rmtkd_resnet` is modeling's step.
    model = _load(save_tiny_resnet(tmp_path, "basic"))
    adapter = get_adapter(model)
    sites = [s for s in adapter.sites(model) if s.layer == 1]
    stats = collect_statistics(model, [{"pixel_values": _images(4, 0)}], adapter.required_captures(sites))
    reduced = adapter.reduce(model, sites, {sites[0].name: 5}, stats,
                             RMTKDConfig(sites=("channels",), output_format="per-layer"))
    assert type(reduced) is ResNetForImageClassification and reduced.config.model_type == "resnet"
    assert reduced.config.to_dict()["per_layer_config"] == {"0": {"inner_sizes": [12]}, "1": {"inner_sizes": [5]}}
    assert reduced.config.num_hidden_layers == 2  # the heterogeneous format counts layers: the residual blocks
    registered = as_output_format(reduced, "per-layer")
    assert type(registered).__name__ == "RMTKDResNetForImageClassification"
    assert "num_hidden_layers" not in registered.config.to_dict()  # derived from `depths` by the registered config
    torch.testing.assert_close(_logits(registered, _images()), _logits(reduced, _images()), rtol=0, atol=0)
    # Saved without the conversion, the folder is the same registered type.
    save_compressed_model(reduced, None, tmp_path / "out", "per-layer")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["model_type"] == "rmtkd_resnet" and "num_hidden_layers" not in saved
    reloaded = _load(tmp_path / "out")
    torch.testing.assert_close(_logits(reloaded, _images()), _logits(reduced, _images()), rtol=0, atol=0)


def test_remote_code_loading_of_per_layer_model(tmp_path):
    model = _load(save_tiny_resnet(tmp_path / "in", "basic"))
    reduced = _reduce(model, lambda s: 5 if s.layer == 1 else s.dim, "per-layer")
    save_compressed_model(reduced, None, tmp_path / "out", "per-layer")
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert reloaded.get_submodule(f"{BLOCK1}.layer.0.convolution").out_channels == 5


def test_stock_format_rejects_inner_widths_it_cannot_express(tmp_path):
    model = _load(save_tiny_resnet(tmp_path, "basic"))
    with pytest.raises(ValueError, match=r"stock format needs inner width 20 in block .*got \[8\]"):
        _reduce(model, lambda s: 8 if s.layer == 1 else s.dim)


def test_widths_that_would_drop_a_shortcut_projection_are_refused(tmp_path):
    model = _load(save_tiny_resnet(tmp_path, "bottleneck"))
    widths = {"resnet.embedder": 8, STAGE0: 8, f"{BLOCK0}.layer.0": 2, f"{BLOCK0}.layer.1": 2}
    with pytest.raises(ValueError, match=r"Block resnet\.encoder\.stages\.0\.layers\.0 has shortcut projection but its "
                                         r"widths \(8 in, 8 out\) make the ResNet classes build it without one"):
        _reduce(model, lambda s: widths.get(s.name, s.dim))


def test_sites_of_another_kind_are_refused(tmp_path):
    model = _load(save_tiny_resnet(tmp_path, "basic"))
    adapter = get_adapter(model)
    site = dataclasses.replace(adapter.sites(model)[0], kind="ffn")
    with pytest.raises(ValueError, match="ResNetAdapter has no site of kind 'ffn'; its kind is 'channels'"):
        adapter.reduce(model, [site], {site.name: 8}, {}, RMTKDConfig(sites=("channels",)))


def test_expressible_widths_tie_each_stage_in_stock_format(resnet_dir):
    model = _load(resnet_dir)
    adapter = get_adapter(model)
    sites = adapter.sites(model)
    asked = {s.name: s.dim for s in sites}
    if model.config.layer_type == "bottleneck":
        asked.update({STAGE0: 4, f"{BLOCK0}.layer.0": 2, f"{BLOCK0}.layer.1": 1, STAGE1: 12, f"{BLOCK1}.layer.1": 2})
        stock = adapter.expressible_widths(model, sites, asked, "stock")
        # Stage 0: an inner width of 2 needs hidden 8 (the inner width is a quarter); stage 1: block 1's other
        # inner unit still asks for its full 7, so hidden stays 28.
        assert stock[STAGE0] == 8 and stock[f"{BLOCK0}.layer.0"] == stock[f"{BLOCK0}.layer.1"] == 2
        assert stock[STAGE1] == 28 and stock[f"{BLOCK1}.layer.1"] == 7
    else:
        asked.update({STAGE0: 4, f"{BLOCK0}.layer.0": 8, STAGE1: 16, f"{BLOCK1}.layer.0": 6})
        stock = adapter.expressible_widths(model, sites, asked, "stock")
        assert stock[STAGE0] == stock[f"{BLOCK0}.layer.0"] == 8 and stock[STAGE1] == stock[f"{BLOCK1}.layer.0"] == 16
    assert adapter.expressible_widths(model, sites, asked, "per-layer") == asked


def test_stage0_keeps_its_shortcut_projection(tmp_path):
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[12, 20], depths=[1, 1], layer_type="basic",
                          num_labels=NUM_LABELS)
    model = ResNetForImageClassification(config).eval()
    adapter = get_adapter(model)
    sites = adapter.sites(model)
    asked = {s.name: 8 if s.name == STAGE0 else s.dim for s in sites}
    widths = adapter.expressible_widths(model, sites, asked, "per-layer")
    # Stage 0 at 8 would equal the stem's 8 at stride 1: the stock classes would then build no projection.
    assert widths[STAGE0] == 9
    reduced = _reduce(model, lambda s: widths[s.name], "per-layer")
    assert reduced.get_submodule(f"{BLOCK0}.shortcut.convolution").out_channels == 9


# --- image task ---------------------------------------------------------------------------------------------------
def test_images_become_channels_last_with_the_processor_channels():
    from optimum_rmtkd.tasks.image_classification import to_channels_last

    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    assert to_channels_last(grey, 3, "image").shape == (4, 5, 3)
    assert to_channels_last(grey.tolist(), 1, "image").shape == (4, 5, 1)
    assert to_channels_last(np.zeros((3, 4, 5)), 3, "image").shape == (4, 5, 3)  # CHW
    assert to_channels_last(Image.fromarray(grey), 3, "image").shape == (4, 5, 3)
    assert to_channels_last(Image.new("RGB", (5, 4)), 1, "image").shape == (4, 5, 1)
    with pytest.raises(ValueError, match=r"`img` column must hold PIL images or 2-D/3-D arrays with 1 or 3 channels, "
                                         r"got an array of shape \(4, 5, 2\)"):
        to_channels_last(np.zeros((4, 5, 2)), 3, "img")


def test_image_dataset_preprocessing_and_collator(tmp_path):
    # Task code, imported here so that the adapter tests above do not depend on the tasks package's layout.
    from transformers import ResNetConfig

    from optimum_rmtkd.tasks import get_task
    from optimum_rmtkd.tasks.base import Columns

    task = get_task("image-classification")
    processor = AutoImageProcessor.from_pretrained(save_tiny_resnet(tmp_path, "basic"))
    dataset = datasets.Dataset.from_dict({"img": [np.full((28, 28), i, np.uint8).tolist() for i in range(5)],
                                          "y": ["b", "a", "b", "c", "a"]})
    prepared = task.prepare({"train_dataset": dataset}, processor, ResNetConfig(num_labels=3),
                            Columns(image="img", label="y"), max_length=0)
    processed = prepared.splits["train_dataset"]
    assert processed.column_names == ["pixel_values", "labels"]
    assert processed["labels"] == [1, 0, 1, 2, 0]  # class names numbered in sorted order, saved in the config
    assert prepared.config_updates["id2label"] == {0: "a", 1: "b", 2: "c"}
    batch = task.collator(processor)(list(processed.with_format("torch")))
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    # A grey image is replicated to every channel.
    torch.testing.assert_close(batch["pixel_values"][:, 0], batch["pixel_values"][:, 2])
    assert batch["labels"].tolist() == [1, 0, 1, 2, 0]
    with pytest.raises(ValueError, match="`calibration` has no column 'image'"):
        task.inputs(dataset, processor, Columns(), max_length=0, name="calibration")


# --- the whole pipeline on real images ---------------------------------------------------------------------------
def _digits(n, offset=0):
    """scikit-learn's 8×8 digits (0–16) upsampled ×4 to 32×32 grey uint8, classes 0–2 (the tiny head has 3)."""
    digits = load_digits(n_class=NUM_LABELS)
    images = (digits.images[offset : offset + n] * 15).astype(np.uint8)
    return datasets.Dataset.from_dict({
        "pixels": [np.kron(image, np.ones((4, 4), np.uint8)) for image in images],
        "digit": digits.target[offset : offset + n].tolist(),
    })


@pytest.mark.slow
@pytest.mark.parametrize("output_format", ["stock", "per-layer"])
def test_compress_tiny_resnet_on_digits(output_format, tmp_path):
    source = save_tiny_resnet(tmp_path / "tiny", "basic")
    compressor = RMTKDCompressor.from_pretrained(source, task="image-classification")
    config = RMTKDConfig(
        sites=("channels",), output_format=output_format, width_multiple=1, min_width=1, sigma2_scale=4.0,
        learning_rate=1e-3, batch_size=32, distillation_epochs=1.0, max_distillation_steps=2, max_metric_drop=None,
        max_kept_ratio=1.0, finetune_epochs=1.0,
    )
    result = compressor.compress(_digits(160), eval_dataset=_digits(48, 160), config=config,
                                 save_directory=tmp_path / "out", image_column="pixels", label_column="digit")
    report = result.report
    assert report["task"] == "image-classification"
    widths = {site["name"]: site["kept_width"] for site in report["sites"]}
    assert set(widths) == {s.name for s in get_adapter(result.model).sites(result.model)}
    if output_format == "stock":  # one compressor stage per ResNet stage
        assert [stage["sites"] for stage in report["stages"]] == [[STAGE1, f"{BLOCK1}.layer.0"],
                                                                   [STAGE0, f"{BLOCK0}.layer.0"]]
        assert widths[STAGE0] == widths[f"{BLOCK0}.layer.0"] and widths[STAGE1] == widths[f"{BLOCK1}.layer.0"]
    else:
        assert len(report["stages"]) == 4
    assert report["parameters"]["compressed"] < report["parameters"]["original"]
    reloaded = _load(tmp_path / "out")
    assert reloaded.config.hidden_sizes == [widths[STAGE0], widths[STAGE1]]
    assert reloaded.get_submodule(f"{BLOCK1}.layer.0.convolution").out_channels == widths[f"{BLOCK1}.layer.0"]
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()
    torch.testing.assert_close(_logits(reloaded, _images()), _logits(result.model.eval(), _images()))


@pytest.mark.slow
def test_onnx_export_of_reduced_resnet(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx_module = pytest.importorskip("optimum_rmtkd.exporters.onnx")
    model = _load(save_tiny_resnet(tmp_path / "tiny", "bottleneck"))
    reduced = _reduce(model, lambda s: 5 if s.layer == 1 else s.dim, "per-layer")
    save_compressed_model(reduced, None, tmp_path / "reduced", "per-layer")
    result = onnx_module.export_onnx(tmp_path / "reduced", tmp_path / "onnx")
    assert result.passed and result.onnx_path.is_file()
    assert max(result.max_abs_diff.values()) <= result.atol
