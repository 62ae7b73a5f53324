"""A causal LM with its key/value cache as plain tensors: the form an ONNX graph (and ONNX Runtime) takes it in.

transformers keeps the cache in a `Cache` object; an exported graph needs one input and one output tensor per layer
and per key/value. `CausalLMWithFlatCache` rebuilds a `DynamicCache` from the flat past tensors, runs the model and
returns the logits and the updated cache flat again, named as optimum's ONNX Runtime classes name them
(`past_key_values.{i}.key/value` in, `present.{i}.key/value` out). A past of length 0 is the prefill step, so one
graph serves the prompt and every decode step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import nn
from transformers import DynamicCache

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class CacheShape:
    """One layer's cached key and value: `(heads, head_size)` each (key/value groups under grouped-query
    attention); the batch and past-length axes are dynamic."""

    key: Tuple[int, int]
    value: Tuple[int, int]


def past_names(num_layers: int) -> List[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> List[str]:
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@torch.no_grad()
def cache_shapes(model: nn.Module) -> List[CacheShape]:
    """Each layer's cache shape, read from one forward on one token: exact for stock and per-layer widths alike,
    without knowing the architecture's config fields."""
    device = next(model.parameters()).device
    output = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    return [CacheShape(key=(layer.keys.shape[1], layer.keys.shape[3]),
                       value=(layer.values.shape[1], layer.values.shape[3])) for layer in output.cache.layers]


def head_size(shapes: Sequence[CacheShape]) -> int:
    """The key head size shared by every layer (the `head_dim` an ONNX runtime sizes an empty cache with)."""
    sizes = {shape.key[1] for shape in shapes}
    if len(sizes) != 1:
        raise ValueError(f"The layers' key head sizes differ ({sorted(sizes)}); one `head_dim` cannot describe them.")
    return sizes.pop()


class CausalLMWithFlatCache(nn.Module):
    """`model` with the cache in and out as flat tensors: `(input_ids, attention_mask, position_ids,
    past_key_values)` → `(logits, *present)`, where `past_key_values` is a tuple of 2 × layers tensors of shape
    `(batch, heads, past_length, head_size)`, keys and values alternating, and `attention_mask` covers past and new
    tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # the wrapper follows the model's mode, it does not set it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_key_values: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        pairs = list(zip(past_key_values[0::2], past_key_values[1::2]))
        cache = DynamicCache(pairs, config=self.model.config)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True)
        present: List[torch.Tensor] = []
        for layer in output.cache.layers:
            present += [layer.keys, layer.values]
        return (output.logits, *present)


@torch.no_grad()
def greedy_decode(model: nn.Module, next_ids: torch.Tensor, attention_mask: torch.Tensor,
                  past: Sequence[torch.Tensor], steps: int) -> torch.Tensor:
    """`steps` greedy decode steps after a prompt, as `generate`'s loop runs them: one token per row per step
    through a `DynamicCache` that grows in place. `past` is the prompt's flat cache (left untouched), `next_ids`
    the `(batch, 1)` tokens that follow it and `attention_mask` the prompt's. Returns the `(batch, steps)` tokens fed."""
    cache = DynamicCache(list(zip(past[0::2], past[1::2])), config=model.config)
    fed = []
    for _ in range(steps):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(attention_mask), 1)], dim=1)
        positions = attention_mask.sum(dim=1, keepdim=True) - 1
        logits = model(input_ids=next_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                       use_cache=True).logits
        fed.append(next_ids)
        next_ids = logits[:, -1:].argmax(dim=-1)
    return torch.cat(fed, dim=1)
