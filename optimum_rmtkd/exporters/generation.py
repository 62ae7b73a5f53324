"""Greedy generation driven by ONNX Runtime on an exported causal LM (`model.onnx` with a key/value cache).

The graph takes the tokens, the attention mask over past and new tokens, their positions and one past tensor per
layer and key/value (`past_key_values.{i}.key/value`), and returns the logits and the grown cache
(`present.{i}.key/value`); an empty past (length 0) is the prefill. `ONNXCausalLM` holds the session and runs
those steps; `generate_onnx` is the one-call form a user reaches for: prompt text in, generated text and token ids
out, token for token what `model.generate(do_sample=False)` gives in PyTorch (the export checks it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .session import ONNX_WEIGHTS_NAME, ort_session_options

PathLike = Union[str, os.PathLike]


@dataclass
class ONNXGeneration:
    """Output of `generate_onnx`.

    Args:
        sequences (`np.ndarray`): prompt and generated token ids, `(batch, prompt_length + new_tokens)`; rows that
            stopped at the end-of-sequence token are padded with it, as `generate` pads them.
        texts (`list[str]`): each row's generated text (prompt excluded, special tokens skipped).
    """

    sequences: np.ndarray
    texts: List[str]


class ONNXCausalLM:
    """An exported causal LM in an ONNX Runtime session, run step by step with its key/value cache.

    The generation loops (`greedy`, `decode`) bind their inputs and outputs (`io_binding`): each step's `present`
    tensors stay where the provider wrote them (GPU memory on CUDA) and are bound as the next step's past, so the
    cache never travels through host memory; only the last position's logits come back for the argmax.

    Args:
        session (`onnxruntime.InferenceSession`): a session of `model.onnx` from an `export_onnx` folder of a
            `text-generation` model; `from_file` opens one.
    """

    def __init__(self, session):
        self.session = session
        inputs = {graph_input.name: graph_input for graph_input in session.get_inputs()}
        self.past_names = [name for name in inputs if name.startswith("past_key_values.")]
        if not self.past_names or "position_ids" not in inputs:
            raise ValueError(
                f"This ONNX graph takes no key/value cache (inputs {sorted(inputs)}); export the causal LM with "
                f"`export_onnx` (or `rmtkd export`), which writes the graph with `past_key_values.*` inputs."
            )
        # Heads and head size are fixed axes of the graph; batch and past length are named (dynamic) ones.
        self.past_shapes = {name: (int(inputs[name].shape[1]), int(inputs[name].shape[3])) for name in self.past_names}
        self.output_names = [output.name for output in session.get_outputs()]
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    @classmethod
    def from_file(cls, onnx_path: PathLike, *, providers: Optional[Sequence[str]] = None,
                  session_options=None) -> "ONNXCausalLM":
        """Open `onnx_path` with `providers` (the CPU one by default) and `session_options` (by default
        `ort_session_options()` for the first provider's device)."""
        import onnxruntime as ort

        providers = list(providers or ["CPUExecutionProvider"])
        if session_options is None:
            session_options = ort_session_options("cuda" if providers[0].startswith("CUDA") else "cpu")
        return cls(ort.InferenceSession(str(onnx_path), session_options, providers=providers))

    def empty_past(self, batch_size: int) -> Dict[str, np.ndarray]:
        return {name: np.zeros((batch_size, heads, 0, size), dtype=np.float32)
                for name, (heads, size) in self.past_shapes.items()}

    @staticmethod
    def _step_inputs(input_ids: np.ndarray, attention_mask: np.ndarray) -> Dict[str, np.ndarray]:
        positions = np.cumsum(attention_mask, axis=1) - 1  # left padding: real tokens count from 0, as `generate`
        positions = np.maximum(positions, 0)[:, -input_ids.shape[1]:].astype(np.int64)
        return {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": positions}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Dict[str, np.ndarray]
             ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """One forward of `input_ids` after `past`; `attention_mask` covers past and new tokens. Returns the logits
        and the grown cache as NumPy arrays, keyed by the input names of the next step."""
        outputs = self.session.run(self.output_names, {**self._step_inputs(input_ids, attention_mask), **past})
        return outputs[0], dict(zip(self.past_names, outputs[1:]))

    def _bound_step(self, binding, input_ids: np.ndarray, attention_mask: np.ndarray, past: Dict[str, object]
                    ) -> Tuple[np.ndarray, Dict[str, object]]:
        """`step` through `binding`: `past` values may be NumPy arrays or the `OrtValue`s a previous step left on
        the device; the returned cache is `OrtValue`s on the device, the logits (last position) a NumPy array."""
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, value in self._step_inputs(input_ids, attention_mask).items():
            binding.bind_cpu_input(name, value)
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.output_names[0], "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[:, -1], dict(zip(self.past_names, outputs[1:]))

    def _greedy_steps(self, step_ids: np.ndarray, mask: np.ndarray, past: Dict[str, object], steps: int,
                      eos: set, fill: int) -> np.ndarray:
        """Up to `steps` greedy tokens after `step_ids` (which `past` does not hold yet); finished rows get
        `fill`, and the loop stops early once every row has produced a token of `eos`."""
        binding = self.session.io_binding()
        generated, finished = [], np.zeros(len(step_ids), dtype=bool)
        for _ in range(steps):
            logits, past = self._bound_step(binding, step_ids, mask, past)
            next_ids = np.where(finished, fill, logits.argmax(axis=-1)).astype(np.int64)
            generated.append(next_ids[:, None])
            finished |= np.isin(next_ids, list(eos))
            if finished.all():
                break
            step_ids = next_ids[:, None]
            mask = np.concatenate([mask, np.ones((len(mask), 1), dtype=np.int64)], axis=1)
        return np.concatenate(generated, axis=1)

    def decode(self, next_ids: np.ndarray, attention_mask: np.ndarray, past: Dict[str, np.ndarray],
               steps: int) -> np.ndarray:
        """`steps` greedy decode steps after a prompt whose cache is `past` (the benchmark's decode phase; see
        `kv_cache.greedy_decode` for PyTorch's). Returns the `(batch, steps)` tokens fed."""
        mask = np.concatenate([attention_mask, np.ones((len(attention_mask), 1), np.int64)], axis=1)
        generated = self._greedy_steps(next_ids, mask, past, steps, eos=set(), fill=0)
        return np.concatenate([next_ids, generated[:, :-1]], axis=1)

    def greedy(self, input_ids: np.ndarray, attention_mask: Optional[np.ndarray] = None, *, max_new_tokens: int,
               eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None
               ) -> np.ndarray:
        """Greedy decoding of `max_new_tokens` tokens (fewer when every row reached `eos_token_id`); rows are
        left-padded prompts. Returns prompt and new tokens, `(batch, prompt_length + generated)`."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        fill = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
        generated = self._greedy_steps(input_ids, mask, self.empty_past(len(input_ids)), max_new_tokens, eos, fill)
        return np.concatenate([input_ids, generated], axis=1)


def _eos_token_ids(folder: Path, tokenizer) -> Optional[List[int]]:
    """End-of-sequence ids as `generate` reads them: the generation config's, else the tokenizer's."""
    generation_config = folder / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text(encoding="utf-8")).get("eos_token_id")
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return None if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def generate_onnx(
    folder: PathLike,
    prompt: Union[str, Sequence[str]],
    max_new_tokens: int = 32,
    *,
    providers: Optional[Sequence[str]] = None,
    session_options=None,
) -> ONNXGeneration:
    """Greedy generation with ONNX Runtime from an exported causal LM folder (the graph and its tokenizer).

    Args:
        folder (`str` or `os.PathLike`): an `export_onnx` folder of a `text-generation` model.
        prompt (`str` or `Sequence[str]`): one prompt, or several (left-padded into one batch).
        max_new_tokens (`int`, *optional*, defaults to 32): tokens to generate; fewer when every row ends with the
            end-of-sequence token of the folder's generation config (or tokenizer).
        providers (`Sequence[str]`, *optional*): ONNX Runtime execution providers; the CPU one by default.
        session_options (`onnxruntime.SessionOptions`, *optional*): see `ONNXCausalLM.from_file`.

    Returns:
        `ONNXGeneration`: token ids (prompt included) and the generated texts.

    Example:
    ```python
    >>> from optimum_rmtkd.exporters.generation import generate_onnx
    >>> generate_onnx("smollm2-rmtkd/onnx", "The capital of France is", max_new_tokens=16).texts[0]
    ```
    """
    from transformers import AutoTokenizer

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    folder = Path(folder)
    if not (folder / ONNX_WEIGHTS_NAME).is_file():
        raise ValueError(f"{str(folder)!r} holds no {ONNX_WEIGHTS_NAME}; export the model first (`rmtkd export`).")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(text, str) or not text for text in prompts):
        raise ValueError(f"`prompt` must be a non-empty string or a sequence of them, got {prompt!r}.")
    encoded = tokenizer(prompts, return_tensors="np", padding=True)
    model = ONNXCausalLM.from_file(folder / ONNX_WEIGHTS_NAME, providers=providers, session_options=session_options)
    sequences = model.greedy(encoded["input_ids"], encoded["attention_mask"], max_new_tokens=max_new_tokens,
                             eos_token_id=_eos_token_ids(folder, tokenizer), pad_token_id=tokenizer.pad_token_id)
    prompt_length = encoded["input_ids"].shape[1]
    texts = tokenizer.batch_decode(sequences[:, prompt_length:], skip_special_tokens=True)
    return ONNXGeneration(sequences=sequences, texts=texts)

