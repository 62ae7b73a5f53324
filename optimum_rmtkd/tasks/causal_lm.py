"""`text-generation`: a decoder language model (`AutoModelForCausalLM`, e.g. Llama) scored by perplexity.

Text is tokenised and packed into blocks of `max_length` tokens, as transformers'
`examples/pytorch/language-modeling/run_clm.py` does: the texts of a split are concatenated, each followed by the
tokenizer's EOS token, and cut into equal blocks; the incomplete last block is dropped, so no block has padding.
`labels` are the `input_ids`; the model predicts each token from the ones before it.

The watched metric is perplexity, exp(mean token negative log-likelihood), lower is better. The stop rule reads its
change as a relative increase (`metric_drop`): `max_metric_drop=0.1` means "stop when the perplexity is 10% above
the uncompressed model's". Perplexity depends on the block length: compare numbers measured with the same
`max_length`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..data import check_columns
from .base import (
    Columns,
    Metrics,
    PreparedData,
    Task,
    check_finite_metrics,
    kl_teacher_student,
    random_token_inputs,
)

logger = logging.get_logger(__name__)

#: The label value the loss and perplexity skip (transformers' convention).
IGNORE_INDEX = -100


def check_block_length(max_length: int) -> None:
    """A block must hold at least one (token, next token) pair."""
    if max_length < 2:
        raise ValueError(
            f"`max_length` must be at least 2 for the text-generation task (a block needs a token and the next one "
            f"to predict), got {max_length}."
        )


def block_length(max_length: int, model_config) -> int:
    """`max_length`, clamped (with a warning) to the model's `max_position_embeddings`."""
    check_block_length(max_length)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        logger.warning(
            "`max_length=%d` is above the model's `max_position_embeddings` (%d); packing blocks of %d tokens.",
            max_length, limit, limit,
        )
        return int(limit)
    return max_length


def pack_texts(dataset: datasets.Dataset, tokenizer, *, text_column: str, max_length: int, name: str = "dataset",
               with_labels: bool = False) -> datasets.Dataset:
    """Tokenise the `text_column` of `dataset` and pack it into blocks of `max_length` tokens (run_clm's grouping).

    Each text keeps the special tokens its tokenizer adds (a Llama tokenizer's BOS) and is followed by the EOS token
    when the tokenizer has one and did not add it already. Empty or blank texts are dropped, with a warning that
    counts them; a missing text (None or NaN) is refused. The tokens of all texts are concatenated over the whole
    split and the remainder that does not fill a last block is dropped.

    Returns a dataset with `input_ids` and `attention_mask` (all ones), and `labels` (= `input_ids`) when
    `with_labels`, each a fixed-length list of `max_length` int64 values.
    """
    check_block_length(max_length)
    eos = getattr(tokenizer, "eos_token_id", None)

    def encode(batch: Dict[str, List[Any]]) -> Dict[str, Any]:
        texts: List[str] = []
        for value in batch[text_column]:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise ValueError(
                    f"`{name}` has a missing text (None or NaN) in column {text_column!r}; drop or fill those rows "
                    "first."
                )
            texts.append(str(value))
        kept = [i for i, text in enumerate(texts) if text.strip()]
        # `verbose=False`: a text longer than the model's length is expected here, since it is cut into blocks.
        encoded = (tokenizer([texts[i] for i in kept], verbose=False, return_attention_mask=False)["input_ids"]
                   if kept else [])
        ids: List[List[int]] = [[] for _ in texts]  # a blank text keeps an empty row, counted and dropped below
        for i, tokens in zip(kept, encoded):
            tokens = list(tokens)
            if eos is not None and (not tokens or tokens[-1] != eos):
                tokens.append(eos)
            ids[i] = tokens
        return {"input_ids": ids}

    # The feature is given: a batch of blank texts alone would be inferred as lists of nulls.
    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {name}",
                            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int64"))}))
    column = tokenized.with_format("arrow")["input_ids"]
    blank = len(column) - pc.sum(pc.greater(pc.list_value_length(column), 0)).as_py() if len(column) else 0
    if blank:
        logger.warning("`%s` has %d empty texts in column %r; dropping them.", name, blank, text_column)
    chunks = [chunk.flatten() for chunk in (column.chunks if isinstance(column, pa.ChunkedArray) else [column])]
    tokens = pa.concat_arrays(chunks).to_numpy(zero_copy_only=False) if chunks else np.zeros(0, dtype=np.int64)
    n_blocks = len(tokens) // max_length
    if n_blocks == 0:
        raise ValueError(
            f"`{name}` has {len(tokens)} tokens in column {text_column!r}, fewer than one block of "
            f"`max_length={max_length}`; lower `max_length` (`--max-length`) or pass more text."
        )
    logger.info(
        "Packed `%s` into %d blocks of %d tokens (%d tokens of the last, incomplete block dropped).",
        name, n_blocks, max_length, len(tokens) - n_blocks * max_length,
    )
    blocks = tokens[: n_blocks * max_length].reshape(n_blocks, max_length)
    block = datasets.List(datasets.Value("int64"), length=max_length)
    columns = {"input_ids": blocks, "attention_mask": np.ones_like(blocks)}
    if with_labels:
        columns["labels"] = blocks
    return datasets.Dataset.from_dict(columns, features=datasets.Features({key: block for key in columns}))


def shifted_targets(logits: torch.Tensor,
                    batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at positions 0..L-2 and the tokens they predict (positions 1..L-1), as the model's own loss shifts
    them, flattened to (B·(L−1), V) and (B·(L−1),), with the mask of the scored positions: labels other than -100
    whose token is not padding (`attention_mask`). Without `labels` in `batch` the targets are the `input_ids`."""
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if batch.get("attention_mask") is not None:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    logits = logits[:, :-1, :]
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), mask.reshape(-1)


class CausalLMTask(Task):
    name = "text-generation"
    title = "Text Generation"
    auto_model_name = "AutoModelForCausalLM"
    architecture_suffixes = ("ForCausalLM",)
    input_columns = ("text",)
    needs_labels = False
    metric_name = "perplexity"
    higher_is_better = False
    # A relative rise (`metric_drop`): after a short distillation a decoder stage rarely comes back within 1.5%.
    default_max_metric_drop = 0.1
    #: A cut decoder relearns far more per step at 1e-4 than at 2e-5 (SmolLM2-135M, FFN −43%, 30 steps: test
    #: perplexity 65.4 at 1e-4, 75.1 at 2e-5, 63.5 at 3e-4); 1e-4 is also what Minitron and Sheared-LLaMA distil
    #: billion-parameter models with, where 3e-4 would be a risk.
    default_learning_rate = 1e-4
    sample_units = ("tokens",)
    preprocessor_class = "AutoTokenizer"
    preprocessor_files = ("tokenizer.json", "tokenizer_config.json")

    # --- models ---------------------------------------------------------------------------------------------
    def head_is_new(self, model: nn.Module, missing_keys: Sequence[str]) -> bool:
        """The LM head is new only when the checkpoint lacks `lm_head` (a bare `LlamaModel`); a tied head is the
        input embedding and is never reported missing."""
        return any(key.split(".")[0] == "lm_head" for key in missing_keys)

    def load_preprocessor(self, name_or_path, **kwargs: Any):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)

    # --- data -----------------------------------------------------------------------------------------------
    def prepare(self, splits, preprocessor, model_config, columns: Columns, max_length: int) -> PreparedData:
        """Pack every split into blocks of `max_length` tokens (clamped to `max_position_embeddings`) with
        `labels` = `input_ids`. No label column is read and no config field changes."""
        length = block_length(max_length, model_config)
        prepared: Dict[str, Optional[datasets.Dataset]] = {}
        for name, dataset in splits.items():
            if dataset is None:
                prepared[name] = None
                continue
            check_columns(dataset, [columns.text], name)
            prepared[name] = pack_texts(dataset, preprocessor, text_column=columns.text, max_length=length,
                                        name=name, with_labels=True)
        return PreparedData(prepared)

    def preprocess(self, dataset, preprocessor, columns: Columns, max_length: int, name: str) -> datasets.Dataset:
        """Blocks of `max_length` tokens without `labels` (the `Task.inputs` route of `analyze`)."""
        return pack_texts(dataset, preprocessor, text_column=columns.text, max_length=max_length, name=name)

    def collator(self, preprocessor):
        """Blocks have equal lengths, so stacking is enough: no padding."""
        from transformers import default_data_collator

        return default_data_collator

    # --- training and evaluation ----------------------------------------------------------------------------
    def forward_kwargs(self) -> Dict[str, Any]:
        """No key/value cache: training, calibration and scoring see whole blocks, so a cache is only built and
        thrown away."""
        return {"use_cache": False}

    def loss(self, student_out, teacher_out, batch, alpha: float, temperature: float) -> torch.Tensor:
        """Per token: α·CE(next token, student) + (1 − α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)), each
        the mean over the scored positions (see `shifted_targets`); the CE alone without a teacher, which equals the
        model's own `outputs.loss`."""
        logits, targets, mask = shifted_targets(student_out.logits, batch)
        ce = F.cross_entropy(logits.float(), targets.masked_fill(~mask, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
        if teacher_out is None or alpha == 1.0:
            return ce
        teacher_logits = teacher_out.logits[:, :-1, :].reshape(logits.shape)
        return alpha * ce + (1.0 - alpha) * kl_teacher_student(logits, teacher_logits, temperature, mask=mask)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataloader, accelerator, metric=None) -> Metrics:
        """Perplexity = exp(Σ token NLL / number of scored tokens) over the whole set.

        Per-block NLL sums and token counts are gathered with `gather_for_metrics` (which drops the blocks repeated
        to even out the last batch) and summed in float64, so two processes give the number one does.
        """
        if metric is not None:
            raise TypeError(
                f"The text-generation task scores models by perplexity and takes no `metric`, got "
                f"{type(metric).__name__}; pass `metric=None`."
            )
        was_training = model.training
        model.eval()
        total_nll = torch.zeros((), dtype=torch.float64)
        total_tokens = 0
        for batch in dataloader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels", None)
            logits = model(**batch, **self.forward_kwargs()).logits
            if labels is not None:
                batch["labels"] = labels
            logits, targets, mask = shifted_targets(logits, batch)
            nll = F.cross_entropy(logits.float(), targets.masked_fill(~mask, IGNORE_INDEX),
                                  ignore_index=IGNORE_INDEX, reduction="none")
            rows = len(batch["input_ids"])
            block_nll = nll.view(rows, -1).sum(dim=1, dtype=torch.float64)
            block_tokens = mask.view(rows, -1).sum(dim=1)
            block_nll, block_tokens = accelerator.gather_for_metrics((block_nll, block_tokens))
            total_nll += block_nll.sum().cpu()
            total_tokens += int(block_tokens.sum())
        model.train(was_training)
        if total_tokens == 0:
            raise ValueError("Cannot compute a perplexity on an evaluation set without any token to predict.")
        perplexity = torch.exp(total_nll / total_tokens).item()  # inf on overflow, nan stays nan: both refused
        return check_finite_metrics({self.metric_name: perplexity}, self.name)

    def metric_drop(self, baseline: float, value: float) -> float:
        """The relative increase of perplexity, `value / baseline - 1` (0.1 = 10% higher): perplexity is a ratio
        scale (exp of a mean log-loss), so an absolute rise means different things at 5 and at 50."""
        return value / baseline - 1.0

    def reached(self, value: float, threshold: float) -> bool:
        """A perplexity at most `threshold`."""
        return value <= threshold

    # --- export ---------------------------------------------------------------------------------------------
    is_generative = True
    # A deep decoder's logits are large (|logit| up to ~31 for SmolLM2-135M) and its activations have outliers, so
    # float32 round-off is large in absolute terms: PyTorch's own eager and SDPA attention differ by 1.5e-3 on the
    # compressed SmolLM2, ONNX Runtime and PyTorch by up to 1e-2 (3e-4 of the logit scale). A broken cache or mask
    # is off by O(1); the greedy generation check guards the tokens themselves.
    onnx_atol = 2e-2
    onnx_attn_implementation = "eager"  # torch.export fails on the SDPA path (`is_causal` becomes a SymBool)

    def onnx_input_names(self, model: nn.Module) -> Tuple[str, ...]:
        """Tokens, mask over past and new tokens, positions, and the key/value cache of every layer."""
        from ..modeling.kv_cache import TOKEN_INPUTS, past_names

        return (*TOKEN_INPUTS, *past_names(len(_cache_shapes(model))))

    def onnx_output_names(self, model: nn.Module) -> Tuple[str, ...]:
        from ..modeling.kv_cache import present_names

        return ("logits", *present_names(len(_cache_shapes(model))))

    def onnx_module(self, model: nn.Module) -> nn.Module:
        from ..modeling.kv_cache import CausalLMWithFlatCache

        return CausalLMWithFlatCache(model)

    def onnx_module_kwargs(self, flat: Dict[str, Any]) -> Dict[str, Any]:
        from ..modeling.kv_cache import TOKEN_INPUTS

        grouped = {name: flat[name] for name in TOKEN_INPUTS}
        grouped["past_key_values"] = tuple(value for name, value in flat.items() if name not in TOKEN_INPUTS)
        return grouped

    def dummy_inputs(self, config, input_names, batch_size: int, size: int, *, with_padding: bool,
                     rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Right-padded random token ids (`random_token_inputs`) and their positions, without a cache: every query
        still sees a real token, so no attention row is fully masked. `decoder_inputs` adds a cache."""
        inputs = random_token_inputs(config, batch_size, size, with_padding=with_padding, rng=rng)
        inputs["position_ids"] = np.broadcast_to(np.arange(size, dtype=np.int64), (batch_size, size)).copy()
        missing = [name for name in input_names if name not in inputs]
        if missing:
            raise ValueError(f"`dummy_inputs` makes no {missing}: a cache needs the model, use `decoder_inputs`.")
        return {name: inputs[name] for name in input_names}

    def decoder_inputs(self, model: nn.Module, batch_size: int, size: int, *, past_length: int = 0,
                       with_padding: bool, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """The graph's inputs for `size` new tokens after a cache of `past_length` tokens; the mask covers the past,
        then the new tokens padded as in `dummy_inputs`, and positions continue after the past. The cache is the
        model's own for random prefix tokens: random keys and values would put attention where no real cache does."""
        from ..modeling.kv_cache import TOKEN_INPUTS, past_names

        inputs = self.dummy_inputs(model.config, TOKEN_INPUTS, batch_size, size, with_padding=with_padding, rng=rng)
        inputs["attention_mask"] = np.concatenate(
            [np.ones((batch_size, past_length), dtype=np.int64), inputs["attention_mask"]], axis=1)
        inputs["position_ids"] += past_length
        if past_length == 0:
            arrays = [np.zeros((batch_size, heads, 0, head_size), dtype=np.float32)
                      for shape in _cache_shapes(model) for heads, head_size in (shape.key, shape.value)]
        else:
            prefix = rng.integers(0, model.config.vocab_size, size=(batch_size, past_length), dtype=np.int64)
            device = next(model.parameters()).device
            with torch.no_grad():
                cache = model(input_ids=torch.from_numpy(prefix).to(device), use_cache=True).cache
            arrays = [tensor.float().cpu().numpy() for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return {**inputs, **dict(zip(past_names(len(arrays) // 2), arrays))}

    def dynamic_axes(self, input_names):
        axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                "position_ids": {0: "batch_size", 1: "sequence_length"}}
        return {name: axes.get(name, {0: "batch_size", 2: "past_sequence_length"}) for name in input_names}

    def onnx_example_inputs(self, model: nn.Module, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Batch 2 with a padded row and a cache of 3 tokens: sizes 0 and 1 would be specialised by the trace."""
        return self.decoder_inputs(model, 2, self.example_size, past_length=3, with_padding=True, rng=rng)

    def onnx_validation_inputs(self, model: nn.Module, shapes, *, with_padding: bool, rng: np.random.Generator):
        """Each shape without a cache (the prefill) and after a cache of `size // 2 + 1` tokens (a decode step)."""
        for batch_size, size in shapes:
            for past_length in (0, size // 2 + 1):
                key = f"{batch_size}x{size}" + (f"+past{past_length}" if past_length else "")
                yield key, self.decoder_inputs(model, batch_size, size, past_length=past_length,
                                               with_padding=with_padding, rng=rng)

    def benchmark_inputs(self, model: nn.Module, batch_size: int, size: int,
                         rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """A prompt of `size` tokens with an empty cache: the prefill, and the start of a decode."""
        return self.decoder_inputs(model, batch_size, size, with_padding=False, rng=rng)

    def onnx_config_updates(self, model: nn.Module) -> Dict[str, Any]:
        """`head_dim` and `use_cache`: optimum's runtime sizes an empty cache with `hidden_size //
        num_attention_heads` unless `head_dim` is given, which is wrong once a cut changed the head count."""
        from ..modeling.kv_cache import head_size

        return {"head_dim": head_size(_cache_shapes(model)), "use_cache": True}

    def max_size(self, config) -> Optional[int]:
        """`max_position_embeddings`: the longest context the model was built for."""
        return getattr(config, "max_position_embeddings", None)

    # --- model card -----------------------------------------------------------------------------------------
    def usage_example(self) -> str:
        return (
            'inputs = preprocessor("The capital of France is", return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=20)\n"
            "print(preprocessor.decode(output[0], skip_special_tokens=True))"
        )

    def onnx_run_example(self) -> str:
        """A greedy loop over the exported graph with plain onnxruntime: the cache starts empty (past length 0) and
        each step feeds back the `present` outputs."""
        return """import numpy as np

inputs = preprocessor("The capital of France is", return_tensors="np")
mask, step_ids, new_ids = inputs["attention_mask"], inputs["input_ids"], []
past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs() if i.name.startswith("past_key_values.")}
for _ in range(20):
    positions = (np.cumsum(mask, axis=1) - 1)[:, -step_ids.shape[1]:]
    logits, *present = session.run(None, {"input_ids": step_ids, "attention_mask": mask,
                                          "position_ids": positions, **past})
    past = dict(zip(past, present))
    step_ids = logits[:, -1:].argmax(-1)
    new_ids.append(int(step_ids[0, 0]))
    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
print(preprocessor.decode(new_ids))
# or: from optimum_rmtkd.exporters.generation import generate_onnx; generate_onnx(f"{folder}/onnx", "...")"""

def _cache_shapes(model: nn.Module):
    from ..modeling.kv_cache import cache_shapes

    return cache_shapes(model)
