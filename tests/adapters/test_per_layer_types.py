"""Registered per-layer types: one config class per family, one model class per task whose Auto class maps it to a
class the family's adapter covers."""
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
)

from optimum_rmtkd import tasks
from optimum_rmtkd.adapters import get_adapter
from optimum_rmtkd.adapters.bert import BertAdapter
from optimum_rmtkd.calibration import collect_statistics
from optimum_rmtkd.configuration import RMTKDConfig
from optimum_rmtkd.modeling import per_layer
from optimum_rmtkd.modeling.per_layer import as_registered_type, per_layer_classes_for, registered_type_for
from optimum_rmtkd.saving import save_compressed_model
from optimum_rmtkd.tasks.sequence_classification import SequenceClassificationTask


@pytest.mark.parametrize(
    ("model_type", "architecture", "auto_class"),
    [("bert", "BertForSequenceClassification", AutoModelForSequenceClassification),
     ("rmtkd_roberta", "RMTKDRobertaForSequenceClassification", AutoModelForSequenceClassification),
     ("distilbert", "DistilBertForSequenceClassification", AutoModelForSequenceClassification),
     ("llama", "LlamaForCausalLM", AutoModelForCausalLM),
     ("rmtkd_qwen2", "RMTKDQwen2ForCausalLM", AutoModelForCausalLM),
     ("resnet", "ResNetForImageClassification", AutoModelForImageClassification)],
)
def test_each_family_has_the_class_of_each_task_that_maps_it(model_type, architecture, auto_class):
    registered = registered_type_for(model_type, architecture)
    stock_name = architecture.removeprefix("RMTKD")
    assert registered.model.__name__ == f"RMTKD{stock_name}" and registered.stock_model.__name__ == stock_name
    assert registered.auto_model is auto_class and issubclass(registered.model, registered.stock_model)
    assert registered.config.model_type == f"rmtkd_{model_type.removeprefix('rmtkd_')}"
    assert auto_class._model_mapping[registered.config] is registered.model
    # A family mapped by a single task's Auto class needs no architecture.
    assert per_layer_classes_for(model_type) == (registered.config, registered.model)


def test_unknown_types_and_architectures_say_what_exists():
    with pytest.raises(ValueError, match=r"not available for model type 'gpt2'; it is for bert, distilbert, llama, "
                                         r"mistral, qwen2, resnet, roberta\."):
        registered_type_for("gpt2")
    with pytest.raises(ValueError, match=r"no class for architecture 'BertForMaskedLM' of model type 'bert'; it has "
                                         r"BertForSequenceClassification \(one per registered task whose Auto class "
                                         r"maps `BertConfig` to a class its adapter covers\)\."):
        registered_type_for("bert", "BertForMaskedLM")


class _FillMaskTask(SequenceClassificationTask):
    """A task whose Auto class is another one: only `name` and `auto_model_name` matter to the registration."""

    name = "test-fill-mask"
    auto_model_name = "AutoModelForMaskedLM"
    architecture_suffixes = ("ForMaskedLM",)


@pytest.fixture
def fill_mask_task(monkeypatch):
    """Register the task (and BERT's adapter as covering its head), and undo every registration it causes when the
    test ends."""
    monkeypatch.setitem(tasks._REGISTRY, _FillMaskTask.name, _FillMaskTask())
    monkeypatch.setattr(BertAdapter, "architectures", BertAdapter.architectures + ("ForMaskedLM",))
    monkeypatch.setattr(per_layer, "PER_LAYER_TYPES", {k: dict(v) for k, v in per_layer.PER_LAYER_TYPES.items()})
    mapping = AutoModelForMaskedLM._model_mapping
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    return _FillMaskTask.name


def test_a_new_task_gets_its_own_per_layer_class(fill_mask_task, tmp_path):
    registered = registered_type_for("bert", "BertForMaskedLM")  # registers the new task's classes on the way
    assert registered.model.__name__ == "RMTKDBertForMaskedLM" and registered.auto_model is AutoModelForMaskedLM
    assert registered.config is registered_type_for("bert", "BertForSequenceClassification").config  # one per family
    with pytest.raises(ValueError, match=r"`architecture` must be given for model type 'bert', which has per-layer "
                                         r"classes for BertForMaskedLM, BertForSequenceClassification\."):
        registered_type_for("bert")

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=23,
                                       num_hidden_layers=2, max_position_embeddings=32)).eval()
    adapter = get_adapter(model)
    ffn = [site for site in adapter.sites(model) if site.kind == "ffn"]
    batches = [{"input_ids": torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    stats = collect_statistics(model, batches, adapter.required_captures(ffn))
    widths = {ffn[0].name: 7, ffn[1].name: 12}
    model = as_registered_type(adapter.reduce(model, ffn, widths, stats, RMTKDConfig(output_format="per-layer")))
    assert type(model) is registered.model
    save_compressed_model(model, None, tmp_path, "per-layer")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["RMTKDBertForMaskedLM"]
    assert saved["auto_map"] == {"AutoConfig": "modeling_rmtkd.RMTKDBertConfig",
                                 "AutoModelForMaskedLM": "modeling_rmtkd.RMTKDBertForMaskedLM"}
    assert 'per_layer_classes_for("bert", "BertForMaskedLM")' in (tmp_path / "modeling_rmtkd.py").read_text()
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is registered.model
    assert [layer.intermediate.dense.out_features for layer in reloaded.bert.encoder.layer] == [7, 12]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batches[0]).logits, model(**batches[0]).logits, rtol=0, atol=0)
