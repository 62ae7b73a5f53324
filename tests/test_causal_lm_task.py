"""The `text-generation` task: packing into blocks, its refusals, the per-token loss, perplexity, registry, export
hooks."""
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

from optimum_rmtkd import RMTKDConfig
from optimum_rmtkd.distillation import train
from optimum_rmtkd.tasks import get_task
from optimum_rmtkd.tasks.base import Columns

LOGGER = "optimum_rmtkd.tasks.causal_lm"
# Word `w{i}` is token i + 3, so a text's tokens are known by hand.
VOCAB = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(60)}}
EOS, BOS = 2, 1


def make_tokenizer(add_bos_eos: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with an EOS token; with `add_bos_eos` it wraps each text in <s> … </s>
    itself, as many decoder tokenizers add BOS (and some EOS)."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos_eos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_config(**kwargs) -> LlamaConfig:
    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                       **kwargs)


def words(start: int, count: int) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


@pytest.fixture(scope="module")
def task():
    return get_task("text-generation")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _prepare(task, tokenizer, max_length, config=None, **splits):
    return task.prepare(splits, tokenizer, config or llama_config(), Columns(), max_length)


# --- packing --------------------------------------------------------------------------------------------------
def test_texts_are_packed_into_blocks_with_eos_between_them(task, tokenizer, caplog):
    texts = ["w0 w1 w2", "", "w3", "   ", "w4 w5 w6 w7 w8"]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepared = _prepare(task, tokenizer, 5, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                            eval_dataset=None)
    # 3 + 1 + 1 + 1 + 5 + 1 = 12 tokens: two blocks of 5, the last 2 tokens (w8, </s>) dropped.
    train = prepared.splits["train_dataset"]
    assert train["input_ids"] == [[3, 4, 5, EOS, 6], [EOS, 7, 8, 9, 10]]
    assert train["labels"] == train["input_ids"]
    assert train["attention_mask"] == [[1] * 5] * 2
    assert prepared.splits["eval_dataset"] is None and prepared.config_updates == {}
    assert "`train_dataset` has 2 empty texts in column 'text'; dropping them." in caplog.text


def test_a_tokenizers_own_bos_and_eos_are_kept_and_eos_is_not_doubled(task):
    dataset = datasets.Dataset.from_dict({"text": ["w0 w1", "w2"]})
    prepared = _prepare(task, make_tokenizer(add_bos_eos=True), 3, train_dataset=dataset)
    assert prepared.splits["train_dataset"]["input_ids"] == [[BOS, 3, 4], [EOS, BOS, 5]]  # last </s> dropped


def test_inputs_have_no_labels_and_the_collator_stacks_blocks(task, tokenizer):
    dataset = datasets.Dataset.from_dict({"text": [words(0, 9)], "other": [1]})
    inputs = task.inputs(dataset, tokenizer, Columns(), 4, "dataset")
    assert inputs.column_names == ["input_ids", "attention_mask"] and len(inputs) == 2
    prepared = _prepare(task, tokenizer, 4, train_dataset=dataset).splits["train_dataset"].with_format("torch")
    batch = task.collator(tokenizer)([prepared[0], prepared[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 4)
    torch.testing.assert_close(batch["labels"], torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]))


@pytest.mark.parametrize(
    "splits, max_length, message",
    [
        (dict(train_dataset=datasets.Dataset.from_dict({"sentence": ["w0 w1"]})), 2,
         r"`train_dataset` has no column 'text'; its columns are sentence"),
        (dict(train_dataset=datasets.Dataset.from_dict({"text": ["w0", None]})), 2,
         r"`train_dataset` has a missing text \(None or NaN\) in column 'text'; drop or fill those rows first"),
        (dict(train_dataset=datasets.Dataset.from_dict({"text": [words(0, 20)]}),
              eval_dataset=datasets.Dataset.from_dict({"text": ["w0 w1", ""]})), 8,
         r"`eval_dataset` has 3 tokens in column 'text', fewer than one block of `max_length=8`; lower `max_length`"),
        (dict(train_dataset=datasets.Dataset.from_dict({"text": ["", " "]})), 2,
         r"`train_dataset` has 0 tokens in column 'text', fewer than one block of `max_length=2`"),
        (dict(train_dataset=datasets.Dataset.from_dict({"text": ["w0 w1"]})), 1,
         r"`max_length` must be at least 2 for the text-generation task \(a block needs a token and the next one "
         r"to predict\), got 1"),
    ],
)
def test_bad_data_and_lengths_are_refused_with_the_fix(task, tokenizer, splits, max_length, message):
    with pytest.raises(ValueError, match=message):
        _prepare(task, tokenizer, max_length, **splits)


def test_max_length_is_clamped_to_the_position_table(task, tokenizer, caplog):
    dataset = datasets.Dataset.from_dict({"text": [words(0, 59), words(0, 59)]})  # 120 tokens
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepared = _prepare(task, tokenizer, 100, train_dataset=dataset)
    assert "`max_length=100` is above the model's `max_position_embeddings` (64); packing blocks of 64" in caplog.text
    assert np.asarray(prepared.splits["train_dataset"]["input_ids"]).shape == (1, 64)


# --- loss -----------------------------------------------------------------------------------------------------
def test_loss_is_per_token_ce_plus_kl_over_the_scored_positions(task):
    g = torch.Generator().manual_seed(0)
    batch_size, length, vocab = 2, 6, 7
    student = torch.randn(batch_size, length, vocab, generator=g)
    teacher = torch.randn(batch_size, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch_size, length), generator=g)
    labels[0, 3] = -100
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[1, 4:] = 0  # right padding
    alpha, temperature = 0.7, 2.0
    # By hand: position t predicts token t + 1; skip targets that are -100 or padding.
    ce, kl, n = 0.0, 0.0, 0
    for b in range(batch_size):
        for t in range(length - 1):
            if labels[b, t + 1] == -100 or attention_mask[b, t + 1] == 0:
                continue
            ce -= torch.log_softmax(student[b, t], -1)[labels[b, t + 1]]
            p_old = torch.softmax(teacher[b, t] / temperature, -1)
            p_new = torch.softmax(student[b, t] / temperature, -1)
            kl += (p_old * (p_old.log() - p_new.log())).sum()
            n += 1
    assert n == 2 * 5 - 1 - 2
    expected = alpha * ce / n + (1 - alpha) * temperature**2 * kl / n
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": attention_mask, "labels": labels}
    out = lambda logits: SimpleNamespace(logits=logits)  # noqa: E731
    torch.testing.assert_close(task.loss(out(student), out(teacher), batch, alpha, temperature), expected)
    torch.testing.assert_close(task.loss(out(student), None, batch, alpha, temperature), ce / n)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


@pytest.fixture(scope="module")
def blocks(task, tokenizer):
    """Five blocks of 16 tokens (the model's loss averages over equal blocks, so it is comparable)."""
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 60, size=rng.integers(3, 12))) for _ in range(30)]
    prepared = _prepare(task, tokenizer, 16, train_dataset=datasets.Dataset.from_dict({"text": texts}))
    dataset = prepared.splits["train_dataset"].select(range(5))
    return dataset.with_format("torch")


def test_loss_without_teacher_is_the_models_own_loss(task, tokenizer, llama, blocks):
    batch = task.collator(tokenizer)([blocks[i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        own = llama(**inputs, labels=batch["labels"]).loss
        torch.testing.assert_close(task.loss(llama(**inputs), None, batch, 0.7, 1.0), own)


# --- evaluation -----------------------------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_token_loss(task, tokenizer, llama, blocks):
    accelerator = Accelerator(cpu=True)
    # Batches of 2 over 5 blocks: an uneven last batch must still weigh each token once.
    loader = accelerator.prepare_data_loader(DataLoader(blocks, batch_size=2, collate_fn=task.collator(tokenizer)))
    metrics = task.evaluate(llama, loader, accelerator)
    everything = task.collator(tokenizer)([blocks[i] for i in range(len(blocks))])
    with torch.no_grad():
        loss = llama(input_ids=everything["input_ids"], attention_mask=everything["attention_mask"],
                     labels=everything["labels"]).loss
    assert list(metrics) == ["perplexity"]
    assert metrics["perplexity"] == pytest.approx(torch.exp(loss).item(), rel=1e-5)  # float32 logits, 75 tokens
    # Unlabelled blocks (the `inputs` route) score their own next tokens: the same number.
    unlabelled = blocks.remove_columns("labels")
    loader = accelerator.prepare_data_loader(DataLoader(unlabelled, batch_size=2, collate_fn=task.collator(tokenizer)))
    assert task.evaluate(llama, loader, accelerator)["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-6)
    assert not llama.training


class _ConstantLM(torch.nn.Module):
    """Every position gets the same logits over a 5-token vocabulary."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=torch.full((*input_ids.shape, 5), self.value))


@pytest.mark.parametrize(
    "value, labels, message",
    [
        (float("nan"), [[1, 2, 3]], r"The text-generation metric `perplexity` is nan; the model diverged"),
        (0.0, [[1, -100, -100]], r"Cannot compute a perplexity on an evaluation set without any token to predict"),
    ],
)
def test_a_degenerate_evaluation_is_refused(task, value, labels, message):
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor(labels)}
    with pytest.raises(ValueError, match=message):
        task.evaluate(_ConstantLM(value), [batch], Accelerator(cpu=True))


def test_uniform_logits_give_the_vocabulary_size_as_perplexity(task):
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[1, 2, 3, 4]])}
    assert task.evaluate(_ConstantLM(0.0), [batch], Accelerator(cpu=True))["perplexity"] == pytest.approx(5.0)


def test_a_custom_metric_is_refused(task, llama):
    with pytest.raises(TypeError, match=r"scores models by perplexity and takes no `metric`, got function; pass "
                                        r"`metric=None`"):
        task.evaluate(llama, [], Accelerator(cpu=True), metric=lambda p, r: 0.0)


# --- registry, stop rule, model loading ----------------------------------------------------------------------
def test_the_registry_maps_causal_lm_configs_to_text_generation(task):
    assert get_task({"architectures": ["LlamaForCausalLM"]}) is task
    assert task.name == "text-generation" and task.auto_model_name == "AutoModelForCausalLM"
    assert task.metric_name == "perplexity" and not task.higher_is_better and not task.needs_labels


def test_metric_drop_is_a_relative_increase(task):
    assert task.metric_drop(baseline=20.0, value=22.0) == pytest.approx(0.1)  # 10% higher perplexity
    assert task.metric_drop(baseline=20.0, value=19.0) == pytest.approx(-0.05)
    assert task.reached(9.0, 10.0) and task.reached(10.0, 10.0) and not task.reached(11.0, 10.0)


@pytest.mark.parametrize("configured, expected", [("auto", 1e-4), (3e-4, 3e-4)])
def test_distillation_takes_the_tasks_learning_rate_unless_one_is_given(task, tokenizer, llama, blocks, monkeypatch,
                                                                        configured, expected):
    rates = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, lr, **kwargs):
            rates.append(lr)
            super().__init__(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    config = RMTKDConfig(learning_rate=configured, max_distillation_steps=1, batch_size=2)
    loader = DataLoader(blocks, batch_size=2, collate_fn=task.collator(tokenizer))
    student = LlamaForCausalLM(llama_config())
    train(student, loader, Accelerator(cpu=True), config, task, teacher=llama, epochs=1.0)
    assert rates == [expected]
    assert get_task("text-classification").learning_rate("auto") == 5e-5


@pytest.mark.parametrize("save, is_new", [("causal-lm-tied", False), ("causal-lm-untied", False), ("bare", True)])
def test_the_head_is_new_only_without_lm_head(task, tmp_path, save, is_new):
    torch.manual_seed(0)
    if save == "bare":
        LlamaModel(llama_config()).save_pretrained(tmp_path)
    else:
        LlamaForCausalLM(llama_config(tie_word_embeddings=save.endswith("-tied"))).save_pretrained(tmp_path)
    model, head_is_new = task.load_model(tmp_path, seed=0)
    assert isinstance(model, LlamaForCausalLM) and head_is_new is is_new


# --- export hooks and card ------------------------------------------------------------------------------------
def test_export_hooks_give_right_padded_token_inputs_and_a_cache(task, llama):
    names = task.onnx_input_names(llama)
    layers, groups, head_dim = llama.config.num_hidden_layers, llama.config.num_key_value_heads, llama.config.head_dim
    assert names == ("input_ids", "attention_mask", "position_ids") + tuple(
        f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))
    assert task.onnx_output_names(llama) == ("logits",) + tuple(
        f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))
    inputs = task.dummy_inputs(llama.config, names[:3], 3, 8, with_padding=True, rng=np.random.default_rng(0))
    assert inputs["input_ids"].shape == (3, 8) and inputs["input_ids"].dtype == np.int64
    assert inputs["attention_mask"].sum(axis=1).tolist() == [8, 6, 4]
    assert inputs["attention_mask"][:, 0].all()  # right padding: every row starts with a real token
    with pytest.raises(ValueError, match="a cache needs the model, use `decoder_inputs`"):
        task.dummy_inputs(llama.config, names, 3, 8, with_padding=True, rng=np.random.default_rng(0))
    # After a cache of 5 tokens: the mask covers past and new tokens, positions continue after the past.
    inputs = task.decoder_inputs(llama, 3, 8, past_length=5, with_padding=True, rng=np.random.default_rng(0))
    assert list(inputs) == list(names)
    assert inputs["attention_mask"].shape == (3, 13) and inputs["attention_mask"][:, :5].all()
    assert inputs["position_ids"][0].tolist() == list(range(5, 13))
    assert inputs["past_key_values.0.key"].shape == (3, groups, 5, head_dim)
    axes = task.dynamic_axes(names)
    assert axes["attention_mask"] == {0: "batch_size", 1: "total_sequence_length"}
    assert axes["past_key_values.0.value"] == {0: "batch_size", 2: "past_sequence_length"}
    # The flat inputs group into the wrapper's keyword arguments, the cache as one tuple in graph order.
    grouped = task.onnx_module_kwargs(inputs)
    assert list(grouped) == ["input_ids", "attention_mask", "position_ids", "past_key_values"]
    assert len(grouped["past_key_values"]) == 2 * layers
    reference = task.onnx_reference_outputs(llama, inputs)
    assert reference["logits"].shape == (3, 8, llama.config.vocab_size)
    assert reference["present.0.key"].shape == (3, groups, 13, head_dim)
    assert task.onnx_config_updates(llama) == {"head_dim": head_dim, "use_cache": True}
    assert task.max_size(llama.config) == 64
    card = task.card_context()
    assert card["task"] == "text-generation" and "model.generate(**inputs" in card["usage_example"]
