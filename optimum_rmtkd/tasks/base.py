"""`Task`: everything between a dataset and a model's outputs that depends on what the model is trained to do.

The compressor, the distillation loop, the exporter, the benchmark, the Hub card and the CLI ask a `Task`; none of
them knows what a label, a token or a pixel is. A new task is one file with a `Task` subclass, registered with
`optimum_rmtkd.tasks.register_task`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import check_columns

#: The watched metric is the first entry of `Task.evaluate`'s dict.
Metrics = Dict[str, float]


@dataclass
class Columns:
    """The user's column names; a task reads the ones it needs (`Task.input_columns`, `Task.label_column`)."""

    text: str = "text"
    text_pair: Optional[str] = None
    image: str = "image"
    label: Optional[str] = "label"

    def get(self, key: str) -> Optional[str]:
        return getattr(self, key)


@dataclass
class PreparedData:
    """Model-ready splits (`None` where not given) and the config fields the run writes into the saved model
    (e.g. the `label2id` / `id2label` actually used)."""

    splits: Dict[str, Optional[datasets.Dataset]]
    config_updates: Dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """What RMT-KD needs to know about one task.

    Class attributes:
        name: the task's name, also the Hub pipeline tag (`text-classification`).
        title: the model-index task name (`Text Classification`).
        auto_model_name: the `transformers` Auto class that loads its models.
        architecture_suffixes: endings of `config.architectures` entries that identify the task.
        input_columns: the `Columns` fields the task reads for its inputs (the first one must exist).
        needs_labels: whether training data must have a label column.
        metric_name: the name of the watched metric when no custom metric is given.
        higher_is_better: the metric's direction; the stop rules read it.
        default_max_metric_drop: what `RMTKDConfig(max_metric_drop="auto")` allows a stage to lose, in
            `metric_drop`'s units.
        default_learning_rate: the learning rate of `RMTKDConfig(learning_rate="auto")`.
        sample_units: the `RMTKDConfig.sample_unit` values calibration may use with this task.
        size_name: what the size of a dummy input is (`sequence_length`, `image_size`).
        is_generative: whether the model generates token by token (exported with a key/value cache, checked by a
            greedy generation, benchmarked by prefill and decode).
        onnx_atol: the default tolerance on max |ONNX Runtime − PyTorch| of an export's outputs.
        onnx_attn_implementation: the attention implementation the model is traced with (`None`: as loaded).
        preprocessor_class / preprocessor_files: the Auto class of its preprocessor and the files that mean one was
            saved (model card).
    """

    name: str
    title: str
    auto_model_name: str
    architecture_suffixes: Tuple[str, ...] = ()
    input_columns: Tuple[str, ...] = ()
    needs_labels: bool = True
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    default_max_metric_drop: float = 0.015
    default_learning_rate: float = 5e-5
    sample_units: Tuple[str, ...] = ("tokens",)
    size_name: str = "sequence_length"
    example_size: int = 16
    validation_shapes: Tuple[Tuple[int, int], ...] = ((2, 16), (3, 37))
    is_generative: bool = False
    onnx_atol: float = 1e-4
    onnx_attn_implementation: Optional[str] = None
    preprocessor_class: Optional[str] = None
    preprocessor_files: Tuple[str, ...] = ()

    # --- models ---------------------------------------------------------------------------------------------
    @property
    def auto_model(self):
        """The Auto class (imported on first use: the registry and the CLI stay free of transformers)."""
        import transformers

        return getattr(transformers, self.auto_model_name)

    def matches(self, config: Mapping[str, Any]) -> bool:
        """The task's own rule for a `config.json` dict whose `architectures` name no task head (default: none);
        `get_task` tries `architecture_suffixes` first."""
        return False

    def load_model(self, name_or_path, seed: int, **kwargs: Any) -> Tuple[nn.Module, bool]:
        """Load a model for the task; return it and whether its task head is new (it must be trained first).

        The head is drawn under `seed`: PyTorch seeds its default generator at random in each process, so an
        unseeded head would make every run, and all that follows, different. The caller's generator is untouched.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, info = self.auto_model.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
        return model, self.head_is_new(model, info.get("missing_keys", ()))

    def head_is_new(self, model: nn.Module, missing_keys: Sequence[str]) -> bool:
        """Whether the weights the loader did not find include the task head."""
        return False

    def load_preprocessor(self, name_or_path, **kwargs: Any):
        """The tokenizer or image processor saved beside the model (`None` when the task needs none)."""
        return None

    # --- data -----------------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(
        self,
        splits: Dict[str, Optional[datasets.Dataset]],
        preprocessor,
        model_config,
        columns: Columns,
        max_length: int,
    ) -> PreparedData:
        """Check and preprocess every split (`train_dataset`, `eval_dataset`, …, keyed by the argument that
        gave it, for messages); the first split fixes anything learned from the data (a label mapping)."""

    @abstractmethod
    def preprocess(self, dataset: datasets.Dataset, preprocessor, columns: Columns, max_length: int,
                   name: str) -> datasets.Dataset:
        """The model inputs of one split (no labels; `prepare` adds those)."""

    def inputs(self, dataset: datasets.Dataset, preprocessor, columns: Columns, max_length: int,
               name: str) -> datasets.Dataset:
        """`preprocess` after checking that `dataset` has the input columns (unlabelled data: `analyze`)."""
        check_columns(dataset, [columns.get(column) for column in self.input_columns], name)
        return self.preprocess(dataset, preprocessor, columns, max_length, name)

    @abstractmethod
    def collator(self, preprocessor) -> Callable:
        """The `collate_fn` of a `DataLoader` over prepared data."""

    # --- training and evaluation ----------------------------------------------------------------------------
    def forward_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of every forward pass the run makes (training, calibration), beside the inputs."""
        return {}

    @abstractmethod
    def loss(self, student_out, teacher_out, batch: Dict[str, torch.Tensor], alpha: float,
             temperature: float) -> torch.Tensor:
        """The training loss: α·(task loss) + (1 − α)·T²·KL(teacher ‖ student); the task loss alone without a
        teacher (`teacher_out is None`)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, dataloader, accelerator, metric=None) -> Metrics:
        """Score `model` on `dataloader` (gathered across processes); the first entry is the watched metric."""

    def metric_label(self, metric=None) -> str:
        """The name the report and the card give the watched metric."""
        return self.metric_name

    def metric_drop(self, baseline: float, value: float) -> float:
        """How much worse `value` is than `baseline`, in the metric's own units (positive = worse); the stop rule
        compares it with `max_metric_drop`."""
        return baseline - value if self.higher_is_better else value - baseline

    def max_metric_drop(self, configured: Union[float, str, None]) -> Optional[float]:
        """The stop rule's limit for `RMTKDConfig.max_metric_drop`: `"auto"` is this task's default."""
        return self.default_max_metric_drop if configured == "auto" else configured

    def learning_rate(self, configured: Union[float, str]) -> float:
        """The learning rate for `RMTKDConfig.learning_rate`: `"auto"` is this task's default."""
        return self.default_learning_rate if configured == "auto" else configured

    def reached(self, value: float, threshold: float) -> bool:
        """Whether `value` is at least as good as `threshold` (the fine-tuning trigger)."""
        return value >= threshold if self.higher_is_better else value <= threshold

    # --- export ---------------------------------------------------------------------------------------------
    @abstractmethod
    def onnx_input_names(self, model: nn.Module) -> Tuple[str, ...]:
        """The inputs of the exported graph, named as optimum's ONNX configs name them."""

    @abstractmethod
    def dummy_inputs(self, config, input_names: Sequence[str], batch_size: int, size: int, *, with_padding: bool,
                     rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Random inputs for tracing, validation and benchmarks (`size`: see `size_name`)."""

    @abstractmethod
    def dynamic_axes(self, input_names: Sequence[str]) -> Dict[str, Dict[int, str]]:
        """The dynamic axes of each input."""

    def onnx_output_names(self, model: nn.Module) -> Tuple[str, ...]:
        """The outputs of the exported graph, in the order `onnx_module(model)` returns them."""
        return ("logits",)

    def onnx_module(self, model: nn.Module) -> nn.Module:
        """The module that is traced: the model itself, or a wrapper whose inputs and outputs are the graph's."""
        return model

    def onnx_module_kwargs(self, flat: Dict[str, Any]) -> Dict[str, Any]:
        """Group one value per graph input (tensors, or their dynamic axes) into `onnx_module`'s keyword arguments,
        keeping the graph's input order when flattened (default: one keyword per input)."""
        return dict(flat)

    def onnx_example_inputs(self, model: nn.Module, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """The inputs the export traces with: batch 2 with a padded row, since `torch.export` specialises sizes
        0 and 1, and an all-ones mask could let a model take a mask-free path that a padded batch never takes."""
        return self.dummy_inputs(model.config, self.onnx_input_names(model), 2, self.example_size,
                                 with_padding=True, rng=rng)

    def onnx_validation_inputs(self, model: nn.Module, shapes: Sequence[Tuple[int, int]], *, with_padding: bool,
                               rng: np.random.Generator) -> Iterator[Tuple[str, Dict[str, np.ndarray]]]:
        """`(key, inputs)` pairs at which an export is compared with PyTorch, one per `(batch_size, size)` shape."""
        names = self.onnx_input_names(model)
        for batch_size, size in shapes:
            yield f"{batch_size}x{size}", self.dummy_inputs(model.config, names, batch_size, size,
                                                            with_padding=with_padding, rng=rng)

    @torch.no_grad()
    def onnx_reference_outputs(self, model: nn.Module, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """PyTorch's values of the graph outputs at `inputs` (float32 NumPy), by name."""
        device = next(model.parameters()).device
        kwargs = self.onnx_module_kwargs({name: torch.from_numpy(array).to(device) for name, array in inputs.items()})
        outputs = self.onnx_module(model)(**kwargs)
        names = self.onnx_output_names(model)
        values = [outputs[name] for name in names] if isinstance(outputs, Mapping) else list(outputs)
        return {name: value.float().cpu().numpy() for name, value in zip(names, values)}

    def benchmark_inputs(self, model: nn.Module, batch_size: int, size: int,
                         rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """The graph's inputs the benchmark times, without padding (a causal LM's: a prompt and an empty cache)."""
        return self.dummy_inputs(model.config, self.onnx_input_names(model), batch_size, size, with_padding=False,
                                 rng=rng)

    def onnx_config_updates(self, model: nn.Module) -> Dict[str, Any]:
        """Fields written into the exported folder's `config.json` for the runtimes that read it (default: none)."""
        return {}

    def max_size(self, config) -> Optional[int]:
        """The largest `size` the model accepts, if it has one."""
        return None

    # --- model card -----------------------------------------------------------------------------------------
    def card_context(self) -> Dict[str, Any]:
        """What the model card template needs to show how to use the model."""
        return {
            "task": self.name, "task_name": self.title, "auto_class": self.auto_model_name,
            "preprocessor_class": self.preprocessor_class, "preprocessor_files": self.preprocessor_files,
            "onnx_run_example": self.onnx_run_example(), "usage_example": self.usage_example(),
        }

    def usage_example(self) -> str:
        """Python lines that use the loaded `model` and `preprocessor` (model card snippet; none by default)."""
        return ""

    def onnx_input_example(self) -> str:
        """Python lines that build the ONNX Runtime `inputs` dict from `preprocessor` (model card snippet)."""
        return ""

    def onnx_run_example(self) -> str:
        """Python lines that run the ONNX `session` with `preprocessor` (model card snippet): by default, build the
        inputs (`onnx_input_example`) and read the logits."""
        inputs = self.onnx_input_example()
        if not inputs:
            return ""
        return inputs + "\nlogits = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]"

def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over rows (only the rows where `mask` is true).

    The T² factor keeps the KL gradients on the CE scale when T > 1 (Hinton et al., 2015).
    """
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    log_p_new = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_old = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p_new, log_p_old, log_target=True, reduction="batchmean")


def check_finite_metrics(metrics: Metrics, task: str) -> Metrics:
    """Refuse a non-finite watched metric: a NaN would silently switch the stop rules off."""
    name, value = next(iter(metrics.items()))
    if not math.isfinite(value):
        raise ValueError(
            f"The {task} metric `{name}` is {value}; the model diverged or the evaluation set is degenerate."
        )
    return metrics


def random_token_inputs(config, batch_size: int, size: int, *, with_padding: bool,
                        rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Random `input_ids` of length `size` from the config's vocabulary and their `attention_mask`. With
    `with_padding`, row i keeps `size - i * size // (batch_size + 1)` tokens followed by padding (pad id, mask 0):
    a batch of two or more rows checks the masked path, and row 0, full, keeps every query row seeing real tokens."""
    input_ids = rng.integers(0, config.vocab_size, size=(batch_size, size), dtype=np.int64)
    attention_mask = np.ones((batch_size, size), dtype=np.int64)
    if with_padding:
        pad_id = getattr(config, "pad_token_id", None) or 0
        for row in range(batch_size):
            length = size - row * size // (batch_size + 1)
            attention_mask[row, length:] = 0
            input_ids[row, length:] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}
