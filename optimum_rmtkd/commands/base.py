"""What every `rmtkd` verb shares: error handling, logging switches, dataset and `RMTKDConfig` flags.

Nothing heavy is imported here (no torch, transformers or scipy), so building the parsers and `--help` stay fast;
each command imports what it needs inside `execute()`, and `configure_logging` (datasets, huggingface_hub,
transformers) runs in `run()`, after parsing. The `choices` are the library's own: the option sets of
`optimum_rmtkd.configuration` (which imports nothing heavy) and the names of `optimum_rmtkd.tasks.task_names()`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import textwrap
import warnings
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from optimum.commands.base import BaseOptimumCLICommand

from ..configuration import (
    CHANNEL_SELECTIONS,
    CONFIG_NAME,
    ESTIMATORS,
    HEAD_REDUCTIONS,
    HIDDEN_CUTS,
    METRIC_DROP_ACTIONS,
    MIXED_PRECISIONS,
    OUTPUT_FORMATS,
    PRESETS,
    SAMPLE_UNITS,
    SITE_KINDS,
    TARGET_MODES,
    RMTKDConfig,
)


logger = logging.getLogger(__name__)

# Errors a user can fix from the message alone: shown as one line, without a traceback unless `--debug`.
USER_ERRORS = (ValueError, TypeError, FileExistsError, OSError, ImportError, RuntimeError)


class RMTKDBaseCommand(BaseOptimumCLICommand):
    """A leaf `rmtkd` command: subclasses add their flags in `parse_args` and do their work in `execute`.

    `run` is what both `optimum-cli rmtkd <verb>` and the `rmtkd <verb>` script call. optimum-cli neither catches
    exceptions nor returns an exit code, so errors are turned into a message and `SystemExit(1)` here.
    """

    # The library's argument names that this verb's messages may name, and what the user types instead (see
    # `cli_message`); each verb extends `COMMON_API_FLAGS`.
    API_FLAGS: Mapping[str, Optional[str]] = {}

    def run(self) -> None:
        configure_logging(quiet=self.args.quiet, debug=self.args.debug, api_flags=self.API_FLAGS)
        try:
            self.execute()
        except KeyboardInterrupt:
            if self.args.debug:
                raise
            print("error: interrupted.", file=sys.stderr)
            raise SystemExit(130)
        except USER_ERRORS as error:
            if self.args.debug:
                raise
            # One line: transformers and datasets wrap lines in their messages.
            message = cli_message(" ".join(str(error).split()) or type(error).__name__, self.API_FLAGS)
            print(f"error: {message} (run with --debug to see the traceback)", file=sys.stderr)
            raise SystemExit(1)

    @abstractmethod
    def execute(self) -> None:
        """Do the command's work with `self.args`; raise an exception from `USER_ERRORS` for a user's mistake."""


# --------------------------------------------------------------------------------------------------------------------
# Library messages, as a command-line user reads them
# --------------------------------------------------------------------------------------------------------------------
# The library's messages name its API (`eval_dataset`, `num_labels=8`, `save_directory`): the fix a user of the API
# needs. On the command line the same messages reach a user who types flags, so every error and log line of a verb
# goes through `cli_message` with the verb's table: API name -> what to type. A key `name` also rewrites `name=value`
# (`num_labels=8` -> `--num-labels 8`); a key `name=` rewrites only that form (bare `base_model` is a card field, not
# the argument); a key with its value (`resume=False`) names a switch; `None` drops the API callable and the "to" before
# it (the command calls it). RMTKDConfig fields are not listed: they are the names of rmtkd_config.json too.
COMMON_API_FLAGS: Dict[str, Optional[str]] = {
    "RMTKDCompressor.from_pretrained": None,
    "RMTKDCompressor.compress": "rmtkd compress",
    "overwrite=True": "--overwrite",
}
DATA_API_FLAGS: Dict[str, Optional[str]] = {
    **COMMON_API_FLAGS,
    "train_dataset": "--dataset",
    "dataset": "--dataset",
    "eval_dataset": "--eval-dataset",
    "test_dataset": "--test-dataset",
    "calibration_dataset": "--calibration-dataset",
    "text_column": "--text-column",
    "text_pair_column": "--text-pair-column",
    "image_column": "--image-column",
    "label_column": "--label-column",
    "task": "--task",
}
_API_SPAN = re.compile(r"(?P<to>\s+(?:to|of)\s+)?`(?P<span>[^`\n]+)`")
# A parenthesis that only repeats the flags just before it, as in "pass `x=1` (`--x 1`)" once `x=1` is rewritten.
_RESTATED = re.compile(r"(?P<flags>`[^`\n]+`(?:/`[^`\n]+`)*) \((?P=flags)(?: on the command line)?\)")


def cli_message(message: str, api_flags: Mapping[str, Optional[str]]) -> str:
    """`message` with the API names of `api_flags` rewritten as the flags a command-line user types.

    A `name=value` span right after "has" describes a model ("the model has `num_labels=2`") and is kept.
    """

    def rewrite(match: "re.Match[str]") -> str:
        span, to = match.group("span"), match.group("to") or ""
        if span in api_flags:
            flag = api_flags[span]
            return "" if flag is None else f"{to}`{flag}`"
        name, equals, value = span.partition("=")
        if not equals or message[:match.start("span") - 1].endswith("has "):
            return match.group(0)
        flag = api_flags.get(name, api_flags.get(f"{name}="))
        if flag is None or not re.fullmatch(r"\w+", name):
            return match.group(0)
        value = value.strip("'\"")
        return f"{to}`{flag}{' ' + value if value else ''}`"

    return _RESTATED.sub(r"\g<flags>", _API_SPAN.sub(rewrite, message))


class _CLIFormatter(logging.Formatter):
    """`[LEVEL] message`, with the verb's API names rewritten as flags (`cli_message`)."""

    def __init__(self, api_flags: Mapping[str, Optional[str]]):
        super().__init__("[%(levelname)s] %(message)s")
        self.api_flags = api_flags

    def formatMessage(self, record: logging.LogRecord) -> str:
        return cli_message(super().formatMessage(record), self.api_flags)


def describe(
    parser: argparse.ArgumentParser, description: str, epilog: Optional[str] = None, usage: Optional[str] = None
) -> None:
    """Give a parser a description and examples: optimum's `add_parser` only sets the one-line help.

    The examples are printed as written (raw formatter), so the description is wrapped here, paragraph by paragraph
    (blank-line separated). `usage` replaces argparse's list of every flag, so that the description comes first.
    """
    parser.description = "\n\n".join(textwrap.fill(paragraph, width=100) for paragraph in description.split("\n\n"))
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if usage is not None:
        parser.usage = usage


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and errors")
    group.add_argument(
        "--quiet", action="store_true",
        help="Only errors from transformers, datasets and optimum-rmtkd, and no progress bars (default: off).",
    )
    group.add_argument(
        "--debug", action="store_true",
        help="Debug logging from optimum-rmtkd, info from transformers, and the Python traceback of an error "
             "(default: off).",
    )


def configure_logging(quiet: bool, debug: bool, api_flags: Optional[Mapping[str, Optional[str]]] = None) -> None:
    """Route optimum-rmtkd's log lines to stderr (INFO by default: the stages of a run) and quiet the libraries.

    The lines name flags, not API arguments: `api_flags` is the verb's table of `cli_message`.
    """
    if quiet:
        # tqdm >= 4.66 reads its defaults from TQDM_* variables when it is first imported, so this must come before
        # any import of tqdm: it silences the bars that libraries draw with plain `tqdm` (transformers' GGUF loader),
        # out of reach of their own `disable_progress_bar()`.
        os.environ["TQDM_DISABLE"] = "1"
    import datasets
    import huggingface_hub
    from transformers.utils import logging as hf_logging

    level = logging.ERROR if quiet else logging.DEBUG if debug else logging.INFO
    package_logger = logging.getLogger("optimum_rmtkd")
    package_logger.setLevel(level)
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_CLIFormatter(api_flags or {}))
        package_logger.addHandler(handler)
        package_logger.propagate = False
    else:
        for handler in package_logger.handlers:
            if isinstance(handler.formatter, _CLIFormatter):
                handler.formatter.api_flags = api_flags or {}
    if quiet:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()
        # torch.onnx's exporter logs warnings (missing torchvision ops) and torch emits FutureWarnings while tracing.
        # Importing torch resets its loggers from TORCH_LOGS, and the commands import torch after this runs, so the
        # variable is set too ("-all": errors only), unless the user set it.
        os.environ.setdefault("TORCH_LOGS", "-all")
        logging.getLogger("torch").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    elif debug:
        hf_logging.set_verbosity_info()
    else:
        hf_logging.set_verbosity_warning()


# --------------------------------------------------------------------------------------------------------------------
# Models and datasets
# --------------------------------------------------------------------------------------------------------------------
def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The model as a positional argument or `-m/--model` (optimum-cli's export uses the flag)."""
    parser.add_argument("model", nargs="?", help="Hub id or local folder of the model (or use -m/--model).")
    parser.add_argument("-m", "--model", dest="model_option", metavar="MODEL",
                        help="Hub id or local folder of the model (same as the positional argument).")


def model_from_args(args: argparse.Namespace) -> str:
    if args.model and args.model_option and args.model != args.model_option:
        raise ValueError(
            f"The model was given twice, as {args.model!r} and `--model` {args.model_option!r}; pass only one."
        )
    model = args.model or args.model_option
    if not model:
        raise ValueError("No model given: pass a Hub id or a local folder, positionally or with `-m/--model`.")
    check_model_source(model)
    return model


def check_model_source(model: str) -> None:
    """Fail fast on a local path that is not a model folder, instead of a slow Hub lookup of a path-shaped id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"The model folder {model!r} has no config.json; pass a folder written by `save_pretrained`, a .gguf "
                "file or a Hub model id."
            )
        return
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(
            f"The model {model!r} was not found: there is no such local folder and it is not a Hub id "
            "(`namespace/name`); pass the path of a folder written by `save_pretrained`."
        ) from None


def model_load_error(model: str, error: OSError) -> OSError:
    """The error to show when loading `model` failed: a local folder's own error, or for a Hub id a message saying
    it was found neither locally nor on the Hub (or its cache), with the fix."""
    if Path(model).expanduser().exists():
        return error
    reason = " ".join(str(error.__cause__ or error).split())
    return OSError(
        f"Could not find the model {model!r} locally (no such folder) or on the Hub ({reason}); pass the path of a "
        "local folder written by `save_pretrained`, or a Hub id this machine can reach or has cached."
    )


def load_model_config(model: str):
    """The model's `PretrainedConfig` (config.json, or a GGUF file's metadata; no weights), or the error
    `model_load_error` words."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    try:
        if path.suffix.lower() == ".gguf":
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(model)
    except OSError as error:
        raise model_load_error(model, error) from error


def task_from_args(args: argparse.Namespace, model: str) -> str:
    """`--task`, or the task detected from the model's config (its architectures, else its adapter's head)."""
    if args.task is not None:
        return args.task
    from ..compressor import default_task

    return default_task(load_model_config(model)).name


def check_num_labels(num_labels: Optional[int], model_config) -> None:
    """`--num-labels` sizes a new task head only: on a checkpoint whose head is trained (its architecture is a
    `*For*Classification`) another count would end in transformers' size-mismatch error after loading."""
    if num_labels is None:
        return
    heads = [name for name in (model_config.architectures or []) if re.fullmatch(r"\w+For\w*Classification", name)]
    if heads and num_labels != model_config.num_labels:
        raise ValueError(
            f"`--num-labels` is {num_labels}, but the model's head ({heads[0]}) has {model_config.num_labels} labels; "
            "--num-labels only sizes a new head: drop it, or start from the base encoder (a checkpoint without a "
            "task head)."
        )


def clamp_max_length(config: RMTKDConfig, task: str, model_config) -> RMTKDConfig:
    """`config` with `max_length` at most the model's input limit (`Task.max_size`, `max_position_embeddings` for
    text): a longer input would index past the position table.

    Clamped rather than refused: the length is a cap on truncation, so the model's limit is what a larger value asks
    for, and the default (128) must run on models built for shorter inputs. A value the user gave is clamped with a
    warning that names the limit; the default is clamped silently.
    """
    from ..tasks import get_task

    limit = get_task(task).max_size(model_config)
    if limit is None or config.max_length <= limit:
        return config
    if config.max_length != _CONFIG_DEFAULTS["max_length"]:
        logger.warning(
            f"`--max-length` {config.max_length} is above the model's limit of {limit} tokens "
            f"(`max_position_embeddings`); texts are truncated to {limit} tokens."
        )
    return dataclasses.replace(config, max_length=limit)


def check_dataset_source(source: Optional[str], flag: str) -> None:
    """Fail at once on a dataset path that does not exist (it would be looked up on the Hub as an id, for seconds)
    or a file with an extension no reader takes (`optimum_rmtkd.data.check_data_source`); reads nothing."""
    if source is not None:
        from ..data import check_data_source

        check_data_source(source, flag)


def read_dataset_file(source: Optional[str], flag: str) -> None:
    """Read a local dataset file before the model loads, so that one that is empty, binary, broken, read with the
    wrong delimiter or without rows fails in seconds with its flag named (`optimum_rmtkd.data.load_split`; `datasets`
    caches what it read for the run). Hub ids and folders are read by the run itself."""
    if source is None:
        return
    from ..data import check_data_source, load_split

    if check_data_source(source, flag) is not None:
        load_split(source, name=flag)


def add_dataset_column_arguments(parser: argparse.ArgumentParser, labels: bool = True) -> None:
    group = parser.add_argument_group("dataset columns")
    group.add_argument("--text-column", default="text", help="Column with the input text (default: text).")
    group.add_argument("--text-pair-column", default=None,
                       help="Column with the second text of sentence-pair tasks (default: none).")
    group.add_argument("--image-column", default="image", help="Column with the images (default: image).")
    if labels:
        group.add_argument("--label-column", default="label",
                           help="Column with the class labels, ids or names (default: label).")
    group.add_argument("--task", default=None, choices=task_choices(),
                       help="The task, which picks the model class, preprocessing, loss and metric (default: "
                            "detected from the model's config (its architectures)).")


def task_choices() -> List[str]:
    """The registered task names, the choices of `--task`; `optimum_rmtkd.tasks` lists them without importing torch."""
    from ..tasks import task_names

    return task_names()


# --------------------------------------------------------------------------------------------------------------------
# RMTKDConfig fields as flags
# --------------------------------------------------------------------------------------------------------------------
def _optional_float(text: str) -> Any:
    """A float, `none` to switch a rule off (kept as the string until the config is built), or `auto`."""
    return text.lower() if text.lower() in ("none", "auto") else float(text)


def _float_or_auto(text: str) -> Any:
    """A float, or `auto` for the task's default."""
    return "auto" if text.lower() == "auto" else float(text)


@dataclass(frozen=True)
class ConfigFlag:
    """One `RMTKDConfig` field as a command-line flag; its `default`, shown in `--help`, is read from the dataclass."""

    field: str
    type: Optional[Callable[[str], Any]]
    help: str
    choices: Optional[Tuple[str, ...]] = None
    nargs: Optional[str] = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def default(self) -> Any:
        return _CONFIG_DEFAULTS[self.field]

    def default_text(self) -> str:
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if isinstance(self.default, tuple):
            return " ".join(self.default)
        return str(self.default)


CONFIG_FLAGS: Tuple[ConfigFlag, ...] = (
    ConfigFlag("estimator", str, "How σ² and the kept rank are estimated.", choices=ESTIMATORS),
    ConfigFlag("quantile", float, "τ, the eigenvalue quantile that starts the `paper` fit; higher cuts more."),
    ConfigFlag("tw_alpha", float, "Level of each Tracy-Widom test of `kritchman-nadler`."),
    ConfigFlag("sigma2_scale", float, "Multiplies the fitted σ²; above 1 cuts more."),
    ConfigFlag("centered", None, "Use the covariance (centred) instead of the paper's uncentred second moment."),
    ConfigFlag("sample_unit", str, "What one sample is for text models: every token, [CLS], or the mean "
               "over each sequence.", choices=SAMPLE_UNITS),
    ConfigFlag("sites", str, "Kinds of site to reduce, in the order the stages run; the paper cuts hidden first.",
               choices=SITE_KINDS, nargs="+"),
    ConfigFlag("calibration_fraction", float, "Share of the training split used for the spectra."),
    ConfigFlag("max_calibration_examples", int, "Cap on calibration examples."),
    ConfigFlag("layerwise_calibration", None, "Calibrate one layer at a time over the whole set, so that a model "
               "loaded with offloaded weights needs about one layer in memory (decoders)."),
    ConfigFlag("width_multiple", int, "Kept widths are rounded up to a multiple of this."),
    ConfigFlag("min_width", int, "No site is reduced below this width."),
    ConfigFlag("head_reduction", str, "How attention follows a narrower hidden width: `prune` whole heads "
               "(fewer, wider heads: faster attention) or `shrink` every head.", choices=HEAD_REDUCTIONS),
    ConfigFlag("channel_selection", str, "Which channels a site keeps when it cannot be rotated: the largest "
               "`variance`, or `qr` on the kept eigenvectors; readers are refitted either way.",
               choices=CHANNEL_SELECTIONS),
    ConfigFlag("hidden_cut", str, "How an encoder's hidden width is cut: keep `coordinates` (stock format) or "
               "`rotation` with the LayerNorms folded exactly (needs --output-format per-layer; slower).",
               choices=HIDDEN_CUTS),
    ConfigFlag("output_format", str, "`stock`: stock architecture, uniform widths, plain from_pretrained; "
               "`per-layer`: each layer's own width in a registered rmtkd_<base> type.", choices=OUTPUT_FORMATS),
    ConfigFlag("distillation_epochs", float, "Self-distillation epochs after each reduction."),
    ConfigFlag("max_distillation_steps", int, "Cap on optimizer steps per stage; none lets the epochs decide."),
    ConfigFlag("learning_rate", _float_or_auto, "Learning rate of fine-tuning and distillation; `auto`: the "
               "task's default."),
    ConfigFlag("batch_size", int, "Batch size of calibration, training and evaluation."),
    ConfigFlag("max_length", int, "Texts are truncated to this many tokens."),
    ConfigFlag("finetune_epochs", float, "Fine-tune before the first reduction (1 epoch is always done when "
               "the task head is new)."),
    ConfigFlag("target_reduction", float, "The share (0-1) of the parameters to remove; --target-mode says how."),
    ConfigFlag("target_mode", str, "`stop`: end the run once --target-reduction is reached; `allocate`: meet it, "
               "one σ² scale for every site found by bisection (the spectra decide where to cut).",
               choices=TARGET_MODES),
    ConfigFlag("max_metric_drop", _optional_float, "A stage whose validation metric is worse than the "
               "uncompressed model's by more than this (accuracy: falls below by; perplexity: rises by this share) is "
               "undone, then --on-metric-drop decides; `auto`: the task's default (0.015 of accuracy, a 10%% "
               "perplexity rise); `none` switches the rule off."),
    ConfigFlag("on_metric_drop", str, "What a stage that breaks --max-metric-drop does once undone: `skip` it and "
               "go on with the next, or `stop` the run (the paper's rule).", choices=METRIC_DROP_ACTIONS),
    ConfigFlag("max_stages", int, "Stop after this many reductions."),
    ConfigFlag("mixed_precision", str, "Mixed precision of training (passed to accelerate).",
               choices=MIXED_PRECISIONS),
    ConfigFlag("seed", int, "Seed of the calibration subset, data order and initialisation."),
)
ANALYSIS_FIELDS = (
    "estimator", "quantile", "tw_alpha", "sigma2_scale", "centered", "sample_unit", "sites", "calibration_fraction",
    "max_calibration_examples", "layerwise_calibration", "width_multiple", "min_width", "head_reduction", "channel_selection", "hidden_cut",
    "output_format", "target_reduction", "batch_size", "max_length", "seed",
)


_CONFIG_DEFAULTS: Dict[str, Any] = {field.name: field.default for field in dataclasses.fields(RMTKDConfig)}


def defaults_text() -> str:
    """The defaults that differ from the paper's recipe, as flags, read from `RMTKDConfig` (for `compress --help`)."""
    return ", ".join(
        f"--{name.replace('_', '-')} {' '.join(value) if isinstance(value, tuple) else value}"
        for name, value in ((name, _CONFIG_DEFAULTS[name]) for name in PRESETS["paper"])
    )


def add_config_arguments(parser: argparse.ArgumentParser, fields: Optional[Sequence[str]] = None) -> None:
    """`--preset`, `--config` and one flag per `RMTKDConfig` field (all, or `fields`); flags default to None = not
    given, so that only what the user gave overrides the preset and the file."""
    group = parser.add_argument_group(
        "RMTKDConfig", "Settings of the run, applied in this order: RMTKDConfig's defaults, --preset, --config, then "
                       "each flag given."
    )
    paper = " ".join(f"--{name.replace('_', '-')} {' '.join(value) if isinstance(value, tuple) else value}"
                     for name, value in PRESETS["paper"].items())
    group.add_argument("--preset", default=None, choices=tuple(PRESETS),
                       help=f"Start from a named recipe: `paper` is the RMT-KD paper's ({paper}); --config and the "
                            "flags given override it (default: none, the defaults below).")
    group.add_argument("--config", default=None, metavar="RMTKD_CONFIG_JSON",
                       help="An rmtkd_config.json (or a folder holding one) to start from (default: none).")
    for flag in CONFIG_FLAGS:
        if fields is not None and flag.field not in fields:
            continue
        help_text = f"{flag.help.rstrip('.')} (default: {flag.default_text()})."
        if flag.type is None:
            group.add_argument(flag.flag, dest=flag.field, action="store_const", const=True, default=None,
                               help=help_text)
        else:
            group.add_argument(flag.flag, dest=flag.field, type=flag.type, default=None, choices=flag.choices,
                               nargs=flag.nargs, help=help_text)


def config_from_args(args: argparse.Namespace, fields: Optional[Sequence[str]] = None) -> RMTKDConfig:
    """The `RMTKDConfig` of the defaults, then `--preset`, then `--config`, then every flag the user gave.

    A bad field read from `--config` (a wrong JSON type such as `"batch_size": "32"`, a NaN) is reported with the
    file's name; `inf` or `nan` given to a flag parse as floats and the config refuses them with its own message.
    """
    preset = getattr(args, "preset", None)
    values: Dict[str, Any] = dict(PRESETS[preset]) if preset is not None else {}
    from_file = _read_config_file(args.config) if args.config is not None else {}
    values.update(from_file)
    from_flags = {}
    for flag in CONFIG_FLAGS:
        if fields is not None and flag.field not in fields:
            continue
        value = getattr(args, flag.field)
        if value is not None:
            from_flags[flag.field] = None if value == "none" else value
    values.update(from_flags)
    try:
        return RMTKDConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        # When the file's own fields (those no flag replaced) fail the same way, the fault is in the file: name it.
        in_file = {name: value for name, value in from_file.items() if name not in from_flags}
        if in_file and _config_error(in_file) == str(error):
            raise type(error)(f"`--config` {args.config!r}: {error}") from None
        raise


def _read_config_file(config: str) -> Dict[str, Any]:
    path = Path(config)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"`--config` {config!r} is not a file; pass the path of an {CONFIG_NAME}.")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"`--config` {config!r} is not valid JSON ({error}); fix or regenerate it.") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"`--config` {config!r} holds a JSON {type(values).__name__}, not an object of RMTKDConfig fields; pass "
            f"an {CONFIG_NAME} written by `rmtkd compress` or `RMTKDConfig.to_json_file`."
        )
    return values


def _config_error(values: Dict[str, Any]) -> Optional[str]:
    """The message `RMTKDConfig.from_dict(values)` fails with, or None."""
    try:
        RMTKDConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        return str(error)
    return None
