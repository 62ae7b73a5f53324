"""`RMTKDCompressor`: calibrate → fit the Marchenko–Pastur bulk → cut → self-distil, stage after stage.

Example:

```python
>>> from optimum_rmtkd import RMTKDCompressor, RMTKDConfig
>>> compressor = RMTKDCompressor.from_pretrained("path/to/fine-tuned-bert")
>>> result = compressor.compress(train, eval_dataset=validation, config=RMTKDConfig(), save_directory="bert-rmtkd")
>>> from transformers import AutoModelForSequenceClassification
>>> model = AutoModelForSequenceClassification.from_pretrained("bert-rmtkd")  # stock format, no custom code
```
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader
from transformers.utils import logging

from . import modeling  # noqa: F401  (registers the per-layer types: a stage checkpoint may be one)
from .adapters import get_adapter
from .adapters.base import adapter_class_for
from .calibration import collect_statistics, layerwise_layout, process_shard
from .configuration import RMTKDConfig
from .data import DatasetLike, calibration_subset, load_split
from .distillation import train
from .modeling.per_layer import as_output_format
from .report import save_spectrum_plots
from .saving import (
    capture_random_states,
    load_checkpoint,
    load_random_states,
    restore_random_states,
    rows_fingerprint,
    save_compressed_model,
    save_random_states,
    weights_fingerprint,
    weights_size,
)
from .tasks import get_task, task_names
from .tasks.base import Columns, Task
from .utils.io import atomic_write_json, check_output_folder
from .utils.memory import peak_rss
from .version import __version__
from .widths import Allocation, allocate_widths, decide_widths

logger = logging.get_logger(__name__)

STATE_NAME = "rmtkd_state.json"
RANDOM_STATES_NAME = "random_states_{}.pt"  # one per process, in each stage folder

# Below these sizes a run works but its numbers are noise: one validation row moves the metric by 1/rows.
MIN_TRAIN_ROWS = 100
MIN_EVAL_ROWS = 50
# A tokenizer that maps more than this share of the training text's tokens to its unknown token is not the model's.
MAX_UNKNOWN_TOKEN_SHARE = 0.5


@dataclass
class RMTKDResult:
    """What `compress` returns: the compressed model (in memory) and the run report (as written to disk)."""

    model: nn.Module
    report: Dict[str, Any]
    save_directory: Path


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class RMTKDCompressor:
    """Compress a Hugging Face model with RMT-KD. Build it with `from_pretrained`, then call `compress`.

    Args:
        model (`transformers.PreTrainedModel`): the model to compress; never modified (a copy is edited).
        preprocessor: its tokenizer or image processor, saved with the compressed model.
        task (`str` or `Task`, *optional*): the task (see `optimum_rmtkd.tasks`); defaults to the one whose Auto
            class builds the model's class (`LlamaForCausalLM`: `text-generation`).
        source (`str`, *optional*): the Hub id or local path it came from, recorded as `base_model`.
        head_is_new (`bool`, *optional*, defaults to `False`): the task head was freshly initialised, so the
            model is fine-tuned before the first reduction.
    """

    def __init__(self, model: nn.Module, preprocessor=None, *, task: Union[str, Task, None] = None,
                 source: Optional[str] = None, head_is_new: bool = False):
        if isinstance(model, (str, os.PathLike)):
            raise TypeError(
                f"`model` must be a loaded model (an nn.Module), got the path {str(model)!r}; load it with "
                f"`RMTKDCompressor.from_pretrained({str(model)!r})`."
            )
        self.adapter = get_adapter(model)
        if not self.adapter.covers(model):
            raise ValueError(
                f"{type(self.adapter).__name__} describes {', '.join(f'*{a}' for a in self.adapter.architectures)} "
                f"models, got {type(model).__name__}: its site tables name that task head's modules. Load the model "
                "with the Auto class of a task it covers (`task=`), or add the head to the adapter."
            )
        self.task = get_task(task) if task is not None else get_task({"architectures": [type(model).__name__]})
        self.model = model
        self.preprocessor = preprocessor
        self.source = source
        self.head_is_new = head_is_new

    @classmethod
    def from_pretrained(
        cls, model_name_or_path: Union[str, os.PathLike], task: Union[str, Task, None] = None,
        num_labels: Optional[int] = None, seed: int = RMTKDConfig.seed, gguf_file: Optional[str] = None,
        **hub_kwargs: Any,
    ) -> "RMTKDCompressor":
        """Load a model and its preprocessor from a Hub id, a local folder or a GGUF file.

        Args:
            model_name_or_path: a Hub id, a folder written by `save_pretrained`, or the path of a `.gguf` file.
            task (`str` or `Task`, *optional*): defaults to the one the checkpoint's config names (its architectures).
            num_labels (`int`, *optional*): classes of a new classification head (default 2).
            seed (`int`, *optional*): the seed a new task head is drawn under (pass the run's `RMTKDConfig.seed`).
            gguf_file (`str`, *optional*): a GGUF file in the folder or Hub repository `model_name_or_path`. Its
                weights are dequantized to float32 on load (`GgufConfig(dequantize=True)`): transformers can save such
                a model with `save_pretrained`, and the cut and distillation need real-valued weights.
            hub_kwargs: passed to `from_pretrained` of the model, its config and its preprocessor.

        A checkpoint without the task's head (e.g. a sentence encoder) gets a new one, drawn under `seed`; the
        compressor then fine-tunes it before compressing. PyTorch seeds its default generator at random in each
        process, so an unseeded head would make every run, and all that follows, different.
        """
        if isinstance(model_name_or_path, nn.Module):
            raise TypeError(
                "`model_name_or_path` must be a Hub id, a folder or a .gguf file, got a "
                f"{type(model_name_or_path).__name__} object; for a model in memory use "
                "`RMTKDCompressor(model, preprocessor)`."
            )
        path = Path(model_name_or_path)
        if gguf_file is None and path.suffix.lower() == ".gguf" and path.is_file():
            model_name_or_path, gguf_file = path.parent, path.name
        model_kwargs: Dict[str, Any] = {}
        if gguf_file is not None:
            from transformers import GgufConfig

            hub_kwargs["gguf_file"] = gguf_file
            model_kwargs.update(quantization_config=GgufConfig(dequantize=True), dtype=torch.float32)
        if num_labels is not None:
            model_kwargs["num_labels"] = num_labels
        source = str(Path(model_name_or_path) / gguf_file) if gguf_file else str(model_name_or_path)
        try:
            if task is None:
                from transformers import AutoConfig

                task = default_task(AutoConfig.from_pretrained(model_name_or_path, **hub_kwargs))
            task = get_task(task)
            model, head_is_new = task.load_model(model_name_or_path, seed, **hub_kwargs, **model_kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights of {source!r} cannot be read ({' '.join(str(error).split())}): the file is damaged or "
                "incomplete; save or download the model again."
            ) from error
        except OSError as error:
            raise OSError(
                f"Could not load a model from {source!r}: pass a local folder with config.json and weights, a .gguf "
                "file, or a Hub model id reachable from this machine (set `HF_HUB_OFFLINE=1` to use the cache)."
            ) from error
        preprocessor = task.load_preprocessor(model_name_or_path, **hub_kwargs)
        return cls(model, preprocessor, task=task, source=source, head_is_new=head_is_new)

    # ------------------------------------------------------------------------------------------------------------
    def compress(
        self,
        train_dataset: DatasetLike,
        eval_dataset: Optional[DatasetLike] = None,
        config: Optional[RMTKDConfig] = None,
        save_directory: Union[str, os.PathLike] = "rmtkd-model",
        calibration_dataset: Optional[DatasetLike] = None,
        metric=None,
        *,
        test_dataset: Optional[DatasetLike] = None,
        text_column: str = "text",
        text_pair_column: Optional[str] = None,
        image_column: str = "image",
        label_column: str = "label",
        overwrite: bool = False,
        resume: bool = True,
    ) -> RMTKDResult:
        """Run the RMT-KD schedule and save the compressed model to `save_directory`.

        Args:
            train_dataset: a `datasets.Dataset`, a local csv/json/parquet file, or a dataset id; used for
                distillation and (10% of it, see `RMTKDConfig.calibration_fraction`) for calibration.
            eval_dataset (*optional*): validation data that the stop rules watch; defaults to a 10% split of the
                training data.
            config (`RMTKDConfig`, *optional*): the run's settings.
            save_directory: output folder; must not be the input model's folder. Stage checkpoints go to
                `<save_directory>.checkpoints` so an interrupted run resumes where it stopped. They are removed when
                the run succeeds and kept when it fails or is interrupted (a disk-full error, a lost machine, Ctrl-C):
                the same call resumes after the last completed stage; `resume=False` (`--no-resume`) starts over.
            calibration_dataset (*optional*): data for the spectra instead of the training subset.
            metric (*optional*): for classification, an `evaluate.EvaluationModule` or a callable
                `(predictions, references)`; defaults to the task's own metric (accuracy computed locally).
            test_dataset (*optional*): held-out data scored before and after compression for the report.
            text_column / text_pair_column / image_column / label_column: the dataset's column names.
            resume (`bool`, *optional*, defaults to `True`): continue from the checkpoints of an interrupted run with
                the same model weights, data and config (refused, naming what differs, when they belong to another).
        """
        config = _check_config(config)
        save_directory = _check_save_directory_type(save_directory)
        self._check_save_directory(save_directory, overwrite)
        set_seed(config.seed)

        train_ds = load_split(train_dataset, "train", name="train_dataset")
        self._check_preprocessor(train_ds, text_column)
        eval_ds = load_split(eval_dataset, "validation", name="eval_dataset") if eval_dataset is not None else None
        if eval_ds is None:
            if len(train_ds) < 10:
                raise ValueError("`train_dataset` is too small to hold out a validation split; pass `eval_dataset`.")
            split = train_ds.train_test_split(test_size=0.1, seed=config.seed)
            train_ds, eval_ds = split["train"], split["test"]
        columns = Columns(text=text_column, text_pair=text_pair_column, image=image_column, label=label_column)
        if config.sample_unit not in self.task.sample_units:
            raise ValueError(
                f"`sample_unit` must be one of {', '.join(map(repr, self.task.sample_units))} for the {self.task.name} "
                f"task, got {config.sample_unit!r}."
            )
        splits = {
            "train_dataset": train_ds,
            "eval_dataset": eval_ds,
            "test_dataset": load_split(test_dataset, "test", name="test_dataset") if test_dataset is not None else None,
            "calibration_dataset": (load_split(calibration_dataset, "train", name="calibration_dataset")
                                    if calibration_dataset is not None else None),
        }
        prepared = self.task.prepare(splits, self.preprocessor, self.model.config, columns, config.max_length)
        train_tok, eval_tok, test_tok, calib_tok = (prepared.splits[name] for name in splits)
        if len(train_tok) < MIN_TRAIN_ROWS or len(eval_tok) < MIN_EVAL_ROWS:
            logger.warning(
                "Only %d training and %d validation rows: distillation and the stop rules are noise below %d and %d "
                "(one validation row moves the metric by %.1f points); pass more data for a result to trust.",
                len(train_tok), len(eval_tok), MIN_TRAIN_ROWS, MIN_EVAL_ROWS, 100 / max(len(eval_tok), 1),
            )
        if calib_tok is not None:
            # Sampled, not truncated: a file sorted by label or source would otherwise bias the spectra.
            calib_tok = calibration_subset(calib_tok, 1.0, config.max_calibration_examples, config.seed)
        else:
            calib_tok = calibration_subset(
                train_tok, config.calibration_fraction, config.max_calibration_examples, config.seed
            )

        accelerator = Accelerator(
            mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
        )
        used = self.task.input_columns + (("label",) if self.task.needs_labels else ())
        dataset_info = {"name": _dataset_name(train_dataset, train_ds)}
        dataset_info.update({f"{key}_column": columns.get(key) for key in used if columns.get(key)})
        run = _Run(self, config, accelerator, save_directory, train_tok, eval_tok, calib_tok, test_tok, metric,
                   dataset_info, prepared.config_updates)
        return run.execute(resume=resume)

    # ------------------------------------------------------------------------------------------------------------
    def _check_save_directory(self, save_directory: Path, overwrite: bool) -> None:
        # Writing replaces the whole folder and its checkpoints folder: the input model must lie in neither, nor
        # either inside it (`check_output_folder`, the guard of every writer).
        source = self.source or getattr(self.model, "name_or_path", None)
        check_output_folder(save_directory, [source], overwrite=overwrite, name="save_directory")
        check_output_folder(f"{save_directory}.checkpoints", [source], overwrite=True, name="save_directory")

    def _check_preprocessor(self, train_ds: datasets.Dataset, text_column: str) -> None:
        """Refuse a task that needs a preprocessor without one, and a tokenizer that does not know the training text:
        `AutoTokenizer` builds a tokenizer of special tokens alone from a folder without tokenizer files, so every
        word becomes the unknown token and the run "succeeds" on nothing, then ships that tokenizer."""
        where = f"{self.source!r}" if self.source else "the model's folder"
        if self.preprocessor is None:
            if self.task.preprocessor_class is not None:
                raise ValueError(
                    f"`preprocessor` is None, but the {self.task.name} task needs one ({self.task.preprocessor_class}):"
                    f" pass `RMTKDCompressor(model, preprocessor)`, or save it beside the model's weights "
                    "(`preprocessor.save_pretrained(folder)`) and load both with `RMTKDCompressor.from_pretrained`."
                )
            return
        unknown_id = getattr(self.preprocessor, "unk_token_id", None)
        if unknown_id is None or text_column not in train_ds.column_names:
            return  # no unknown token (byte-level BPE, image processors), or a missing column the task reports
        texts = [text for text in train_ds.select(range(min(100, len(train_ds))))[text_column] if isinstance(text, str)]
        if not texts:
            return
        ids = self.preprocessor(texts, add_special_tokens=False)["input_ids"]
        total = sum(len(row) for row in ids)
        unknown = sum(token == unknown_id for row in ids for token in row)
        if total and unknown / total > MAX_UNKNOWN_TOKEN_SHARE:
            tokenizer = f"The tokenizer of {self.source!r}" if self.source else "The tokenizer (`preprocessor`)"
            raise ValueError(
                f"{tokenizer} maps {unknown / total:.0%} of the tokens of the first {len(texts)} training texts to "
                f"{self.preprocessor.unk_token!r} (a vocabulary of {len(self.preprocessor)} tokens; at most "
                f"{MAX_UNKNOWN_TOKEN_SHARE:.0%} may be unknown): {where} has no tokenizer files, or not this model's; "
                "pass a folder that holds them beside the model's weights, or save them there with "
                "`tokenizer.save_pretrained(folder)`."
            )


def _check_config(config) -> RMTKDConfig:
    """`None` (the defaults), an `RMTKDConfig`, or a dict of its fields (as `RMTKDConfig.from_dict` reads)."""
    if config is None:
        return RMTKDConfig()
    if isinstance(config, RMTKDConfig):
        return config
    if isinstance(config, dict):
        return RMTKDConfig.from_dict(config)
    raise TypeError(
        f"`config` must be an RMTKDConfig or a dict of its fields, got {type(config).__name__}; pass "
        "`RMTKDConfig(...)`, or `RMTKDConfig.from_json_file(path)` for a saved rmtkd_config.json."
    )


def _check_save_directory_type(save_directory) -> Path:
    """A folder path: `Path(None)` fails inside pathlib, and `""` would be the working directory."""
    if not isinstance(save_directory, (str, os.PathLike)) or not str(save_directory).strip():
        raise TypeError(
            f"`save_directory` must be a folder path (a non-empty str or os.PathLike), got {save_directory!r}; pass "
            "the folder to write the compressed model to, e.g. `save_directory=\"bert-rmtkd\"`."
        )
    return Path(save_directory)


def default_task(config) -> Task:
    """The task of a model config: the one its `architectures` name, else the one whose head its architecture's
    adapter describes (a GGUF file's config names no architecture; its Llama adapter covers `*ForCausalLM`), else
    the registry's default."""
    if not config.architectures:
        adapter = adapter_class_for(config.model_type)
        for name in task_names():
            task = get_task(name)
            if adapter is not None and set(task.architecture_suffixes) & set(adapter.architectures):
                return task
    return get_task(config)


def _dataset_name(source, dataset: datasets.Dataset) -> Optional[str]:
    """A Hub-style name for the report: the id or path the user gave, else the Dataset's own recorded name."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(dataset.info, "dataset_name", None) or None


class _Run:
    """One compression run: owns the working model, the checkpoints and the report being built."""

    def __init__(self, compressor, config, accelerator, save_directory, train_tok, eval_tok, calib_tok, test_tok,
                 metric, dataset_info, config_updates):
        self.compressor = compressor
        self.adapter = compressor.adapter
        self.task = compressor.task
        self.config_updates = config_updates
        self.config = config
        self.accelerator = accelerator
        self.save_directory = save_directory
        self.checkpoints = Path(f"{save_directory}.checkpoints")
        self.metric = metric
        self.dataset_info = dataset_info
        collator = self.task.collator(compressor.preprocessor)
        self.train_loader = DataLoader(
            train_tok.with_format("torch"), batch_size=config.batch_size, shuffle=True, collate_fn=collator,
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.eval_loader = accelerator.prepare_data_loader(
            DataLoader(eval_tok.with_format("torch"), batch_size=config.batch_size * 2, collate_fn=collator)
        )
        self.test_loader = (
            accelerator.prepare_data_loader(
                DataLoader(test_tok.with_format("torch"), batch_size=config.batch_size * 2, collate_fn=collator)
            ) if test_tok is not None else None
        )
        # What a checkpoint must match to be resumed: the same input model, task and data, not only the same config.
        # The weights and rows are fingerprinted by content: other weights saved into the same folder, or other rows
        # of the same count, are another run.
        data = {"train": train_tok, "eval": eval_tok, "calibration": calib_tok, "test": test_tok}
        self.identity = {
            "source": compressor.source, "task": self.task.name,
            "model_config": compressor.model.config.to_dict(),
            "weights": weights_fingerprint(compressor.model),
            "data": {name: {"rows": len(split), "fingerprint": rows_fingerprint(split)}
                     for name, split in data.items() if split is not None},
        }
        if len(calib_tok) < accelerator.num_processes:
            # An empty shard would raise on one process while the others wait forever in the all-reduce.
            raise ValueError(
                f"The calibration set has {len(calib_tok)} examples, fewer than the {accelerator.num_processes} "
                "processes; pass a larger `calibration_dataset` or raise `calibration_fraction`."
            )
        shard = process_shard(calib_tok, accelerator)
        self.calibration_loader = DataLoader(
            shard.with_format("torch"), batch_size=config.batch_size, collate_fn=collator
        )
        self.n_calibration_examples = len(calib_tok)

    # --- helpers -----------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, loader=None) -> float:
        """The watched metric (the first the task reports) of `model` on the validation (or given) data."""
        metrics = self.task.evaluate(model.to(self.accelerator.device), loader or self.eval_loader, self.accelerator,
                                     self.metric)
        return next(iter(metrics.values()))

    def schedule(self, model: nn.Module) -> List[List[str]]:
        """Stages as lists of site names (see `Adapter.stages`): stock widths are one config field per group of
        layers, so a group is cut in one stage; the per-layer format goes layer by layer, as the paper does."""
        return [[site.name for site in group] for group in self.adapter.stages(model, self.config)]

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save_checkpoint(self, model: nn.Module, state: Dict[str, Any]) -> None:
        """Save the model after a stage and every process's random states, then point the state file at them; only
        then drop the older stage folder, so an interruption at any moment leaves a state file naming a complete
        checkpoint."""
        stage_dir = self.checkpoints / f"stage-{state['completed_stages']}"
        if self.accelerator.is_main_process:
            save_compressed_model(
                model, self.compressor.preprocessor, stage_dir, self.config.output_format, overwrite=True
            )
        self.accelerator.wait_for_everyone()
        # The states of this moment: a resumed run restores them before its next stage, as this run goes on with them.
        save_random_states(stage_dir / RANDOM_STATES_NAME.format(self.accelerator.process_index),
                           self.random_states())
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_json(self.checkpoints / STATE_NAME, dict(state, checkpoint=stage_dir.name))
            for old in self.checkpoints.glob("stage-*"):
                if old != stage_dir:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def random_states(self) -> Dict[str, Any]:
        """Every random state the rest of the run draws from: the global generators, the training loader's shuffling
        generator, and Accelerate's step counter (it decides which micro-batches accumulate before a step)."""
        return dict(capture_random_states({"train_loader": self.train_loader.generator}),
                    accelerator_step=self.accelerator.step)

    def restore_random_states(self, stage_dir: Path) -> None:
        path = stage_dir / RANDOM_STATES_NAME.format(self.accelerator.process_index)
        if not path.is_file():
            logger.warning("%s is missing (the checkpoint was written by another number of processes): the resumed "
                           "run will not equal an uninterrupted one.", path)
            return
        states = load_random_states(path)
        restore_random_states(states, {"train_loader": self.train_loader.generator})
        self.accelerator.step = states["accelerator_step"]

    def load_state(self) -> Optional[Dict[str, Any]]:
        path = self.checkpoints / STATE_NAME
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        identity = json.loads(json.dumps(self.identity))
        saved = state.get("identity") or {}
        # What differs, in the words of the message.
        parts = {
            "config": state.get("config") == self.config.to_dict(),
            "input model": all(saved.get(key) == identity[key] for key in ("source", "task", "model_config")),
            "input weights": saved.get("weights") == identity["weights"],
            "data": saved.get("data") == identity["data"],
        }
        differing = [part for part, same in parts.items() if not same]
        if differing:
            # Refuse rather than restart: restarting would delete the other run's stages.
            raise ValueError(
                f"The checkpoints in {str(self.checkpoints)!r} belong to another run (different "
                f"{', '.join(differing[:-1]) + ' and ' if len(differing) > 1 else ''}{differing[-1]}); pass "
                "`resume=False` (`--no-resume`) to start over and replace them, or choose another `save_directory`."
            )
        return state

    # --- the pipeline ------------------------------------------------------------------------------------------
    def execute(self, resume: bool) -> RMTKDResult:
        state = self.load_state() if resume else None  # a refusal leaves the other run's checkpoints as they are
        try:
            return self._execute(state)
        except BaseException as error:
            self.explain_kept_checkpoints(error)
            raise

    def explain_kept_checkpoints(self, error: BaseException) -> None:
        """A failed or interrupted run keeps its checkpoints (a disk-full error or Ctrl-C should not cost the stages
        done): say where they are and how to resume or start over."""
        path = self.checkpoints / STATE_NAME
        if not self.accelerator.is_main_process or not path.is_file():
            return
        completed = json.loads(path.read_text()).get("completed_stages", 0)
        logger.warning(
            "The run %s after %d completed stage(s); its checkpoints are kept in %r: run the same command again to "
            "resume from there, or pass `resume=False` (`--no-resume`) to start over (or delete the folder).",
            "was interrupted" if isinstance(error, KeyboardInterrupt) else f"failed ({type(error).__name__})",
            completed, str(self.checkpoints),
        )

    def _execute(self, state: Optional[Dict[str, Any]]) -> RMTKDResult:
        config, accelerator = self.config, self.accelerator
        if state is not None:
            stage_dir = self.checkpoints / state["checkpoint"]
            model = load_checkpoint(stage_dir, self.task.auto_model)
            self.restore_random_states(stage_dir)
            logger.info("Resuming after stage %d from %s", state["completed_stages"], self.checkpoints)
        else:
            model = copy.deepcopy(self.compressor.model)  # the input model is never modified
            for key, value in self.config_updates.items():  # e.g. the label names the data gave
                setattr(model.config, key, value)
            state = self.initial_state()
            model = self.finetune_if_needed(model, state)
            state["baseline_metric"] = self.evaluate(model)
            if self.test_loader is not None:
                state["baseline_test_metric"] = self.evaluate(model, self.test_loader)
            state["parameters_original"] = count_parameters(self.compressor.model)
            if config.target_mode == "allocate":
                state["allocation"] = self.allocate(model, state).to_dict()
            self.save_checkpoint(model, state)
        model = model.to(accelerator.device)

        stages = self.schedule(model)
        while state["stop_reason"] is None:
            if state["completed_stages"] >= len(stages):
                state["stop_reason"] = "no site left"
                break
            if config.max_stages is not None and state["completed_stages"] >= config.max_stages:
                state["stop_reason"] = f"max_stages={config.max_stages} reached"
                break
            model = self.run_stage(model, stages[state["completed_stages"]], state)
            self.save_checkpoint(model, state)

        if count_parameters(model) >= state["parameters_original"]:
            skipped = sum(1 for record in state["stages"] if record.get("skipped"))
            undone = sum(1 for record in state["stages"] if record.get("reverted"))
            note = (f"nothing was cut: of {len(state['stages'])} stage(s), {skipped} were skipped (a kept width "
                    f"≥ {config.max_kept_ratio:.0%} of the original) and {undone} were undone (the validation metric "
                    "dropped too far)")
            state["stop_reason"] = f"{state['stop_reason']}; {note}"
            logger.warning(
                "%s%s; the saved model has the input model's widths: raise `max_kept_ratio` (`--max-kept-ratio`) to "
                "cut sites that keep most of their width, or `max_metric_drop` (`--max-metric-drop`) to accept a "
                "larger drop.", note[0].upper(), note[1:],
            )
        return self.finish(model, state)

    def initial_state(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(), "identity": self.identity, "completed_stages": 0, "stages": [], "sites": {},
            "baseline_metric": None, "baseline_test_metric": None, "stop_reason": None,
            "parameters_original": None, "calibration_peak_rss_mb": 0.0,
        }

    def calibrate(self, model: nn.Module, sites, state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """One calibration pass: every statistic `reduce(sites)` reads, all-reduced across processes; its peak
        resident memory goes into `state["calibration_peak_rss_mb"]` (the largest over the run)."""
        stats, _, peak = peak_rss(lambda: collect_statistics(
            model, self.calibration_loader, self.adapter.required_captures(sites), sample_unit=self.config.sample_unit,
            accelerator=self.accelerator, forward_kwargs=self.task.forward_kwargs(),
            layerwise=layerwise_layout(self.adapter, model, self.config),
            offload_folder=self.checkpoints / "statistics",  # the output's disk, not a RAM-backed /tmp
        ))
        if state is not None:
            state["calibration_peak_rss_mb"] = max(state["calibration_peak_rss_mb"], peak / 2**20)
        return stats

    def allocate(self, model: nn.Module, state: Dict[str, Any]) -> Allocation:
        """The widths that meet `target_reduction` with the spectra deciding where to cut (`allocate_widths`), from
        one calibration pass over every site the stages will cut; the stages then cut to them."""
        sites = [site for group in self.adapter.stages(model, self.config) for site in group]
        stats = self.calibrate(model, sites, state)
        allocation = allocate_widths(self.adapter, model, stats, self.config, self.config.target_reduction)
        logger.info(
            "Size target −%.1f%%: σ² × %.3g gives widths %s, %d parameters (−%.1f%%); a uniform cut to the same size "
            "would keep %.0f%% of every site: %s.", 100 * self.config.target_reduction, allocation.scale,
            allocation.widths, allocation.parameters, 100 * allocation.reduction, 100 * allocation.uniform_share,
            allocation.uniform_widths,
        )
        return allocation

    def finetune_if_needed(self, model: nn.Module, state: Dict[str, Any]) -> nn.Module:
        config = self.config
        epochs = config.finetune_epochs if config.finetune_epochs > 0 else (1.0 if self.compressor.head_is_new else 0)
        if epochs <= 0:
            return model
        reason = "the task head is new" if self.compressor.head_is_new else "`finetune_epochs` is set"
        logger.info("Fine-tuning for up to %s epoch(s) before compressing (%s).", epochs, reason)

        def reached_trigger(current: nn.Module) -> bool:
            if config.trigger_metric is None:
                return False
            return self.task.reached(self.evaluate(current), config.trigger_metric)

        model = train(model, self.train_loader, self.accelerator, config, self.task, epochs=epochs,
                      description="Fine-tuning", stop_check=reached_trigger)
        state["finetuned_epochs"] = epochs
        return model

    def run_stage(self, model: nn.Module, site_names: List[str], state: Dict[str, Any]) -> nn.Module:
        config = self.config
        index = state["completed_stages"]
        sites = [s for s in self.adapter.sites(model) if s.name in site_names]
        stats = self.calibrate(model, sites, state)
        decision = decide_widths(self.adapter, model, sites, stats, config)
        widths, reports = decision.widths, decision.reports
        if state.get("allocation"):  # a size target: the widths were allocated before the first stage
            widths = {name: state["allocation"]["widths"][name] for name in widths}
        for name, report in reports.items():
            state["sites"][name] = dict(report.to_dict(), kept_width=widths[name])
        few = {name: report for name, report in reports.items() if report.q > 1}
        if few:
            logger.warning(
                "Stage %d: fewer calibration samples than the width at %s (q = width / samples > 1): the Marchenko-"
                "Pastur edge is unreliable there; pass more calibration data (`calibration_dataset`, "
                "`calibration_fraction`, `max_calibration_examples`) or count every token as a sample "
                "(`sample_unit='tokens'`).", index + 1,
                ", ".join(f"{name} ({r.n_samples} samples, width {r.original_width}, q = {r.q:.2f})"
                          for name, r in few.items()),
            )
        worth_it = {
            name: w for name, w in widths.items()
            if w < config.max_kept_ratio * next(s.dim for s in sites if s.name == name)
        }
        record = {"stage": index + 1, "sites": site_names, "widths": widths, "metric_before_distillation": None,
                  "metric_after_distillation": None, "parameters": count_parameters(model), "skipped": None}
        state["completed_stages"] = index + 1
        if len(worth_it) < len(widths):
            record["skipped"] = f"kept width ≥ {config.max_kept_ratio:.0%} of the original width"
            if config.output_format == "stock" or not worth_it:
                state["stages"].append(record)
                return model
        cut = [s for s in sites if s.name in worth_it]
        after = self.adapter.parameters_after_cut(model, cut, worth_it, stats, config)
        if after is not None and after >= record["parameters"]:
            # E.g. a tied decoder's hidden cut: the head it unties adds vocab × k, more than a mild cut saves.
            record["skipped"] = (
                f"the cut would leave {after:,} parameters, no fewer than the {record['parameters']:,} now"
            )
            logger.info("Stage %d skipped: %s.", index + 1, record["skipped"])
            state["stages"].append(record)
            return model

        teacher = copy.deepcopy(model).eval()  # the checkpoint before this reduction
        model = as_output_format(self.adapter.reduce(model, cut, worth_it, stats, config), config.output_format)
        del stats
        record["metric_before_distillation"] = self.evaluate(model)
        model = train(model, self.train_loader, self.accelerator, config, self.task, teacher=teacher,
                      epochs=config.distillation_epochs, description=f"Stage {index + 1}: distilling")
        metric = self.evaluate(model)
        record["metric_after_distillation"] = metric
        record["parameters"] = count_parameters(model)
        state["stages"].append(record)
        logger.info("Stage %d (%s): widths %s, metric %.4f -> %.4f after distillation, %d parameters",
                    index + 1, ", ".join(site_names), worth_it, record["metric_before_distillation"], metric,
                    record["parameters"])

        reduction = 1 - record["parameters"] / state["parameters_original"]
        max_drop = self.task.max_metric_drop(config.max_metric_drop)
        if max_drop is not None and self.task.metric_drop(state["baseline_metric"], metric) > max_drop:
            record["reverted"] = True
            record["parameters"] = count_parameters(teacher)  # the model going on is the one before the cut
            if config.on_metric_drop == "stop":
                state["stop_reason"] = (
                    f"validation metric {metric:.4f} is worse than the uncompressed {state['baseline_metric']:.4f} by "
                    f"more than {max_drop}; kept the previous stage"
                )
            else:
                logger.warning("Stage %d undone: validation metric %.4f is worse than %.4f by more than %s; going on.",
                               index + 1, metric, state["baseline_metric"], max_drop)
            return teacher
        if config.target_reduction is not None and reduction >= config.target_reduction:
            state["stop_reason"] = f"target reduction {config.target_reduction:.0%} reached ({reduction:.1%})"
        return model

    def finish(self, model: nn.Module, state: Dict[str, Any]) -> RMTKDResult:
        accelerator = self.accelerator
        final_metric = self.evaluate(model)
        test_metric = self.evaluate(model, self.test_loader) if self.test_loader is not None else None
        report = self.build_report(model, state, final_metric, test_metric)
        if accelerator.is_main_process:
            save_compressed_model(
                model, self.compressor.preprocessor, self.save_directory, self.config.output_format, overwrite=True,
                config=self.config, report=report,
                # The report's sites carry the widths the saved model really has (a reverted stage keeps its own).
                plots=lambda folder: save_spectrum_plots({s["name"]: s for s in report["sites"]}, folder, report),
            )
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        accelerator.wait_for_everyone()
        return RMTKDResult(model=model, report=report, save_directory=self.save_directory)

    def build_report(self, model, state, final_metric, test_metric) -> Dict[str, Any]:
        original = state["parameters_original"]
        compressed = count_parameters(model)
        widths = {name: site["kept_width"] for name, site in state["sites"].items()}
        kept = [dict(site, kept_width=self._final_width(model, name, widths)) for name, site in state["sites"].items()]
        return {
            "base_model": self.compressor.source,
            "task": self.task.name,
            "package_version": __version__,
            "dataset": dict(self.dataset_info, calibration_samples=self.n_calibration_examples),
            "metric_name": self.task.metric_label(self.metric),
            "metric_higher_is_better": self.task.higher_is_better,
            "metrics": {
                "original": state["baseline_test_metric"] if test_metric is not None else state["baseline_metric"],
                "compressed": test_metric if test_metric is not None else final_metric,
                "teacher_distilled": None,
                "original_validation": state["baseline_metric"],
                "compressed_validation": final_metric,
                "evaluated_on": "test" if test_metric is not None else "validation",
            },
            "parameters": {"original": original, "compressed": compressed, "reduction": 1 - compressed / original},
            # The compressed size is measured on the saved files by `save_compressed_model`.
            "size_bytes": {"original": weights_size(self.compressor.source), "compressed": None},
            "calibration_peak_rss_mb": state["calibration_peak_rss_mb"],
            "sites": kept,
            "stages": state["stages"],
            "output_format": self.config.output_format,
            "allocation": state.get("allocation"),
            "stop_reason": state["stop_reason"],
        }

    def _final_width(self, model, name: str, decided: Dict[str, int]) -> int:
        """The width the saved model really has (a reverted or skipped stage keeps the original)."""
        current = {s.name: s.dim for s in self.adapter.sites(model)}
        return current.get(name, decided[name])
