"""Model card and Hub push for a folder written by `RMTKDCompressor.compress`.

The card is derived from `rmtkd_report.json`, never typed by hand: metadata (base model, datasets, eval results as
model-index) lets the Hub link the model tree and show the scores, and the body shows what was cut, where, on which
data, and how to load the result. The push goes through `huggingface_hub` only (`create_repo`, `upload_folder`), so
`endpoint=` (or `HF_ENDPOINT`) points it at any Hub-compatible server.
"""
from __future__ import annotations

import glob
import json
import os
import re
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional, Union

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from .tasks import get_task, task_names
from .utils.io import atomic_write_text, check_output_folder


logger = logging.get_logger(__name__)

PathLike = Union[str, os.PathLike]

REPORT_NAME = "rmtkd_report.json"
CARD_NAME = "README.md"
BENCHMARK_NAME = "benchmark.md"
CARD_TAGS = ["rmt-kd", "optimum-rmtkd", "compressed", "knowledge-distillation"]
# Package data (setup.cfg `[options.package_data]`), so a wheel install has it too.
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "rmtkd_model_card_template.md"
# Temporary files of `optimum_rmtkd.utils.io` (`.{name}.{random}.tmp`) must never reach the Hub.
TEMP_FILE_PATTERNS = [".*.tmp", "*/.*.tmp"]
# What `push_to_hub` uploads: the files that belong to the model, matched against each path relative to the folder
# segment by segment (`*` never crosses a `/`, so `*.safetensors` is not `checkpoint-500/model.safetensors`). Anything
# else stays local and is logged: caches (a benchmark's ONNX exports of the original under `onnx/<name>/`, the
# `source.json` of absolute local paths beside them), benchmark.json/.png, checkpoints, notes.
_MODEL_FILES = (
    # weights and configs
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    # tokenizer, image processor, processor
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "*.model", "tokenizer.model.v*", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    # RMT-KD: its config and report, the per-layer modeling code, the card and the table it embeds, the plots
    "rmtkd_*.json", "modeling_rmtkd.py", CARD_NAME, BENCHMARK_NAME,
)
ONNX_DIR = "onnx"
MODEL_FILE_PATTERNS = (
    *_MODEL_FILES,
    "spectra/*.png",
    # `rmtkd export`'s folder: the graph, its external data, and the files copied beside it.
    *(f"{ONNX_DIR}/{pattern}" for pattern in ("*.onnx", "*.onnx.data", "*.onnx_data", *_MODEL_FILES)),
)
# Never uploaded, even where a pattern above matches: hidden files (the temporary files of `optimum_rmtkd.utils.io`)
# and the compressor's checkpoint state, which records local paths.
LOCAL_FILE_PATTERNS = (".*", "*/.*", "rmtkd_state.json", f"{ONNX_DIR}/rmtkd_state.json")
WEIGHT_FILES = [
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
]

_REPORT_KEYS = [
    "base_model", "task", "package_version", "dataset", "metric_name", "metrics", "parameters", "size_bytes",
    "sites", "stages", "output_format", "stop_reason",
]
_OUTPUT_FORMATS = ("stock", "per-layer")


class RMTKDHubError(OSError):
    """A push to the Hub failed; the message says which step and what to do, `__cause__` keeps the original error."""


def build_model_card(
    model_dir: PathLike,
    *,
    base_model: Optional[str] = None,
    datasets: Optional[Union[str, list[str]]] = None,
    template_path: Optional[PathLike] = None,
    repo_id: Optional[str] = None,
    include_onnx: bool = True,
    benchmark: Optional[PathLike] = None,
) -> ModelCard:
    """Build the model card of an RMT-KD output folder from its `rmtkd_report.json`.

    The Hub only links a model tree and a dataset page for Hub ids, so a base model or dataset recorded as a local
    path stays out of the metadata (the body names the folder, not the full path); pass the Hub id to fix that.
    The license is taken from a README.md already in the folder, else from the base model's README.md when the base
    model is a local folder; nothing is fetched from the network.

    Args:
        model_dir (`str` or `os.PathLike`):
            The `save_directory` of `RMTKDCompressor.compress`.
        base_model (`str`, *optional*):
            Hub id of the uncompressed model; defaults to `base_model` of the report when it is a Hub id.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of the data used; defaults to the report's dataset name when it is a Hub id.
        template_path (`str` or `os.PathLike`, *optional*):
            A Jinja model card template; defaults to `optimum_rmtkd/model_cards/rmtkd_model_card_template.md`
                (shipped with the package).
        repo_id (`str`, *optional*):
            The Hub repository the card describes, used as the model name and in the usage snippets; defaults to the
            folder name.
        include_onnx (`bool`, *optional*, defaults to `True`):
            Describe the `onnx/` export when the folder has one; `push_to_hub(include_onnx=False)` passes `False`
            because the export is not uploaded then.
        benchmark (`str` or `os.PathLike`, *optional*):
            A `benchmark.md`, or the folder `rmtkd benchmark --output` wrote it to, whose table goes in the card;
            defaults to `model_dir/benchmark.md` when it exists (no benchmark section otherwise).

    Returns:
        `huggingface_hub.ModelCard`: the rendered card; `str(card)` is the README.md text.

    Example:

    ```python
    >>> from optimum_rmtkd.hub import build_model_card
    >>> card = build_model_card("minilm-rmtkd", repo_id="me/minilm-rmtkd")
    >>> card.data.base_model
    'sentence-transformers/all-MiniLM-L6-v2'
    ```
    """
    model_dir = Path(model_dir)
    report = _load_report(model_dir)
    task = report["task"]
    if task not in task_names():
        raise ValueError(f"`task` in {REPORT_NAME} must be one of {task_names()}, got {task!r}.")
    if report["output_format"] not in _OUTPUT_FORMATS:
        raise ValueError(
            f"`output_format` in {REPORT_NAME} must be one of {list(_OUTPUT_FORMATS)}, got {report['output_format']!r}."
        )
    task_card = get_task(task).card_context()
    repo_id = repo_id or model_dir.resolve().name
    model_name = repo_id.split("/")[-1]

    base_source = report["base_model"]
    if base_model is None:
        base_model = base_source if _is_hub_id(base_source) else None
        if base_model is None:
            logger.warning(
                f"The base model {base_source!r} is a local path, so the card has no `base_model` metadata; pass "
                "`base_model=` with its Hub id to link the model tree."
            )
    dataset_source = report["dataset"].get("name")
    if datasets is None:
        datasets = [dataset_source] if dataset_source is not None and _is_hub_id(dataset_source) else None
    elif isinstance(datasets, str):
        datasets = [datasets]

    metric_name = report["metric_name"]
    metrics = report["metrics"]
    eval_results = []
    if datasets:
        for key, label in (("compressed", "compressed model"), ("original", "original model, before compression")):
            if metrics.get(key) is not None:
                eval_results.append(
                    EvalResult(
                        task_type=task,
                        task_name=task_card["task_name"],
                        dataset_type=datasets[0],
                        dataset_name=datasets[0],
                        metric_type=metric_name,
                        metric_value=metrics[key],
                        metric_name=f"{metric_name} ({label})",
                    )
                )
    card_data = ModelCardData(
        base_model=base_model,
        datasets=datasets,
        eval_results=eval_results or None,
        library_name="transformers",
        license=_find_license(model_dir, base_source),
        metrics=[metric_name],
        model_name=model_name if eval_results else None,
        pipeline_tag=task,
        tags=list(CARD_TAGS),
    )

    from .exporters.onnx import default_disabled_optimizers

    config_path = model_dir / "config.json"
    model_type = json.loads(config_path.read_text())["model_type"] if config_path.is_file() else None
    plots = _existing_plots(model_dir, report["sites"])
    benchmark_path = _benchmark_path(model_dir, benchmark)
    dataset = report["dataset"]
    context = {
        "model_name": model_name,
        "repo_id": repo_id,
        "base_model_ref": _model_ref(base_model, base_source),
        "package_version": report["package_version"],
        **task_card,
        "preprocessor_class": (
            task_card["preprocessor_class"]
            if any((model_dir / name).is_file() for name in task_card["preprocessor_files"]) else None
        ),
        "model_type": model_type,
        "output_format": report["output_format"],
        "stop_reason": report["stop_reason"],
        "dataset_ref": _dataset_ref(datasets, dataset_source),
        "dataset_columns": ", ".join(
            f"{key.removesuffix('_column').replace('_', ' ')} column `{value}`"
            for key, value in dataset.items() if key.endswith("_column") and value
        ),
        "calibration_samples": dataset.get("calibration_samples"),
        "metric_name": metric_name,
        "has_teacher_metric": metrics.get("teacher_distilled") is not None,
        "metric_rows": [
            {
                "label": f"Original ({_model_ref(base_model, base_source)})",
                "value": _fmt_metric(metrics.get("original")),
            },
            {
                "label": "Teacher distilled for the same schedule",
                "value": _fmt_metric(metrics.get("teacher_distilled")),
            },
            {"label": "**Compressed (this model)**", "value": f"**{_fmt_metric(metrics.get('compressed'))}**"},
        ],
        "params_original": f"{report['parameters']['original']:,}",
        "params_compressed": f"{report['parameters']['compressed']:,}",
        "reduction_pct": f"{100 * report['parameters']['reduction']:.1f}%",
        "size_original": _fmt_bytes(report["size_bytes"].get("original")),
        "size_compressed": _fmt_bytes(report["size_bytes"]["compressed"]),
        "sites": [_site_row(site) for site in report["sites"]],
        "stages": [
            {
                "stage": stage["stage"],
                "sites": ", ".join(f"`{name}`" for name in stage["sites"]),
                "before": _fmt_metric(stage["metric_before_distillation"]),
                "after": _fmt_metric(stage["metric_after_distillation"]),
                "parameters": f"{stage['parameters']:,}",
            }
            for stage in report["stages"]
        ],
        "spectrum_plot": plots[0] if plots else None,
        "more_plots": plots[1:],
        "benchmark": _demote_headings(benchmark_path.read_text(encoding="utf-8"), 2) if benchmark_path else None,
        "onnx": include_onnx and (model_dir / "onnx" / "model.onnx").is_file(),
        # Written out so the card's snippet needs only onnxruntime (see `exporters.onnx.ort_session_options`).
        "ort_cpu_disabled_optimizers": ";".join(default_disabled_optimizers("cpu")),
        "heavy_tailed": [_site_row(site) for site in report["sites"] if site["heavy_tailed"]],
    }
    if template_path is None:
        template_path = DEFAULT_TEMPLATE_PATH
        if not template_path.is_file():
            raise FileNotFoundError(
                f"The default model card template {str(template_path)!r} is missing from this installation; pass "
                "`template_path=` with a Jinja template."
            )
    return ModelCard.from_template(card_data, template_path=str(template_path), **context)


def write_model_card(
    model_dir: PathLike,
    *,
    repo_id: Optional[str] = None,
    base_model: Optional[str] = None,
    datasets: Optional[Union[str, list[str]]] = None,
    template_path: Optional[PathLike] = None,
    include_onnx: bool = True,
    benchmark: Optional[PathLike] = None,
) -> Path:
    """Write the card of `build_model_card` (same arguments) to `model_dir/README.md` atomically and return its path.

    Example:

    ```python
    >>> from optimum_rmtkd.hub import write_model_card
    >>> write_model_card("minilm-rmtkd")
    PosixPath('minilm-rmtkd/README.md')
    ```
    """
    card = build_model_card(
        model_dir,
        base_model=base_model,
        datasets=datasets,
        template_path=template_path,
        repo_id=repo_id,
        include_onnx=include_onnx,
        benchmark=benchmark,
    )
    path = _check_card_folder(Path(model_dir)) / CARD_NAME
    atomic_write_text(path, str(card))
    return path


def push_to_hub(
    model_dir: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    commit_message: Optional[str] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    include_onnx: bool = True,
    base_model: Optional[str] = None,
    datasets: Optional[Union[str, list[str]]] = None,
    benchmark: Optional[PathLike] = None,
) -> str:
    """Upload an RMT-KD output folder to a Hub model repository, with its model card.

    The repository is created if needed (`exist_ok=True`) and files identical to the remote ones are skipped, so
    re-running a push (after a network failure, say) is safe and finishes what is missing. README.md is rewritten
    from the report unless it exists and was not written by optimum-rmtkd (then it is pushed as it is, so a
    hand-written card is never lost). Nothing local is deleted or moved, whatever fails; the authentication is
    checked (by creating the repository) before README.md is written. Only the model's files are uploaded
    (`model_files`: weights, configs, tokenizer or processor files, `rmtkd_*.json`, modeling code, README.md,
    benchmark.md, `spectra/*.png` and the `onnx/` export); caches and other files stay local, and a warning names them.

    Args:
        model_dir (`str` or `os.PathLike`):
            The `save_directory` of `RMTKDCompressor.compress`.
        repo_id (`str`):
            `namespace/name` of the model repository.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository as private (an existing repository keeps its visibility).
        token (`str`, *optional*):
            A token with write access; defaults to `HF_TOKEN` or the one saved by `hf auth login`.
        endpoint (`str`, *optional*):
            The Hub URL; defaults to `HF_ENDPOINT` (read when `huggingface_hub` is imported) or https://huggingface.co.
        commit_message (`str`, *optional*):
            Defaults to a summary of the compression.
        revision (`str`, *optional*):
            Branch to push to, created from `main` if it does not exist; defaults to `main`.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against `main` instead of pushing to it.
        include_onnx (`bool`, *optional*, defaults to `True`):
            Upload the `onnx/` export when the folder has one.
        base_model (`str`, *optional*):
            Hub id of the uncompressed model for the card metadata, as in `build_model_card`; needed when the report
            names a local path.
        datasets (`str` or `list[str]`, *optional*):
            Hub ids of the data for the card metadata, as in `build_model_card`.
        benchmark (`str` or `os.PathLike`, *optional*):
            The `benchmark.md` (or its folder) whose table goes in the card, as in `build_model_card`; only the
            card embeds it, the file itself is uploaded only when it lies in `model_dir`.

    Returns:
        `str`: the URL of the commit, or of the pull request when `create_pr=True`.

    Example:

    ```python
    >>> from optimum_rmtkd.hub import push_to_hub
    >>> push_to_hub("minilm-rmtkd", "me/minilm-rmtkd")
    'https://huggingface.co/me/minilm-rmtkd/commit/...'
    ```
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(
            f"`model_dir` must be an existing folder written by `RMTKDCompressor.compress`, got {str(model_dir)!r}."
        )
    missing = [name for name in ("config.json", REPORT_NAME) if not (model_dir / name).is_file()]
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        missing.insert(1, f"model weights ({' or '.join(WEIGHT_FILES)})")
    if missing:
        raise ValueError(
            f"`model_dir` {str(model_dir)!r} is missing {', '.join(missing)}; push the `save_directory` written by "
            "`RMTKDCompressor.compress`."
        )
    if create_pr and revision not in (None, "main"):
        raise ValueError(
            f"`revision` must be None with `create_pr=True` (pull requests open against `main`), got {revision!r}."
        )
    # Build the card before any network call, so a malformed report fails here and not after creating a repository.
    _check_card_folder(model_dir)
    card_kwargs = {"base_model": base_model, "datasets": datasets, "include_onnx": include_onnx, "benchmark": benchmark}
    card = build_model_card(model_dir, repo_id=repo_id, **card_kwargs)
    report = _load_report(model_dir)
    if commit_message is None:
        commit_message = (
            f"Upload {report['base_model'].split('/')[-1]} compressed with RMT-KD "
            f"({100 * report['parameters']['reduction']:.1f}% fewer parameters)"
        )

    api = HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)
    repo_url = _call_hub(
        api.create_repo, f"creating the repository {repo_id!r}", api.endpoint, repo_id,
        repo_id=repo_id, private=private, exist_ok=True, repo_type="model",
    )
    if repo_url.repo_id != repo_id:
        # A name without namespace was created under the token's user: the card must name the real repository.
        repo_id = repo_url.repo_id
        card = build_model_card(model_dir, repo_id=repo_id, **card_kwargs)
    _refresh_card(model_dir, card)
    if revision is not None and not revision.startswith("refs/pr/"):
        _call_hub(
            api.create_branch, f"creating the branch {revision!r}", api.endpoint, repo_id,
            repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model",
        )
    upload, left_out = model_files(model_dir, include_onnx=include_onnx)
    if left_out:
        shown = ", ".join(left_out[:8]) + (f" and {len(left_out) - 8} more" if len(left_out) > 8 else "")
        logger.warning(f"Not uploading {shown}: not part of the model (caches, benchmark results, other files).")
    commit = _call_hub(
        api.upload_folder, "uploading the files", api.endpoint, repo_id,
        repo_id=repo_id,
        folder_path=model_dir,
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=[glob.escape(path) for path in upload],  # exactly the files chosen, as patterns
        ignore_patterns=TEMP_FILE_PATTERNS,
    )
    url = commit.pr_url if create_pr and commit.pr_url else commit.commit_url
    logger.info(f"Pushed {model_dir} to {repo_id} on {api.endpoint}: {url}")
    return url


def model_files(model_dir: PathLike, *, include_onnx: bool = True) -> tuple[list[str], list[str]]:
    """The files of `model_dir` that `push_to_hub` uploads (`MODEL_FILE_PATTERNS`, less `LOCAL_FILE_PATTERNS`, less
    `onnx/` unless `include_onnx`) and those it leaves out, as sorted `/`-separated paths relative to the folder."""
    model_dir = Path(model_dir)
    upload, left_out = [], []
    for path in sorted(model_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(model_dir).as_posix()
        keep = (
            any(_matches(relative, pattern) for pattern in MODEL_FILE_PATTERNS)
            and not any(_matches(relative, pattern) for pattern in LOCAL_FILE_PATTERNS)
            and (include_onnx or not relative.startswith(f"{ONNX_DIR}/"))
        )
        (upload if keep else left_out).append(relative)
    # Hidden files (temporary files, .git) are no news: they are left out without a word.
    return upload, [path for path in left_out if not any(part.startswith(".") for part in path.split("/"))]


def _matches(relative: str, pattern: str) -> bool:
    """`fnmatch` segment by segment: `*` stays within one folder level."""
    parts, pattern_parts = relative.split("/"), pattern.split("/")
    return len(parts) == len(pattern_parts) and all(map(fnmatchcase, parts, pattern_parts))


def _load_report(model_dir: Path) -> dict[str, Any]:
    path = model_dir / REPORT_NAME
    if not path.is_file():
        raise ValueError(
            f"`model_dir` {str(model_dir)!r} has no {REPORT_NAME}, so it is not an RMT-KD output folder; pass the "
            "`save_directory` written by `RMTKDCompressor.compress`."
        )
    report = json.loads(path.read_text(encoding="utf-8"))
    missing = [key for key in _REPORT_KEYS if key not in report]
    if missing:
        raise ValueError(
            f"{REPORT_NAME} in {str(model_dir)!r} lacks the keys {missing}; write it again with the installed "
            "optimum-rmtkd."
        )
    return report


def _benchmark_path(model_dir: Path, benchmark: Optional[PathLike]) -> Optional[Path]:
    """The benchmark.md to embed: `benchmark` (a file or the folder holding benchmark.md), else the folder's own."""
    if benchmark is None:
        own = model_dir / BENCHMARK_NAME
        return own if own.is_file() else None
    path = Path(benchmark)
    if path.is_dir():
        path = path / BENCHMARK_NAME
    if not path.is_file():
        raise ValueError(
            f"`benchmark` must be a {BENCHMARK_NAME} or a folder holding one, got {str(benchmark)!r}; pass the "
            "`--output` folder of `rmtkd benchmark`."
        )
    return path


def _check_card_folder(model_dir: Path) -> Path:
    """README.md is written into `model_dir`: run the output guard against the base model it was compressed from.

    Only an absolute `base_model` path is checked: a relative one was recorded relative to the compress run's
    working directory, which is unknown here, so resolving it against this one could name an unrelated folder.
    """
    base = _load_report(model_dir)["base_model"]
    inputs = [base] if isinstance(base, str) and os.path.isabs(base) else []
    return check_output_folder(model_dir, inputs, overwrite=None, name="model_dir")


def _refresh_card(model_dir: Path, card: ModelCard) -> None:
    """Write README.md unless it exists and was not generated here (its metadata lacks our tag)."""
    path = model_dir / CARD_NAME
    if path.is_file():
        tags = ModelCard.load(path, ignore_metadata_errors=True).data.tags or []
        if "optimum-rmtkd" not in tags:
            logger.warning(
                f"{path} was not written by optimum-rmtkd, so it is pushed as it is; delete it or call "
                "`write_model_card` to push the RMT-KD model card."
            )
            return
    atomic_write_text(path, str(card))


def _call_hub(method: Callable[..., Any], stage: str, endpoint: str, repo: str, /, **kwargs: Any) -> Any:
    """Run one `HfApi` call and turn its HTTP or transport failure into an `RMTKDHubError` that says what to do."""
    try:
        return method(**kwargs)
    except HfHubHTTPError as err:
        raise RMTKDHubError(_push_error_message(err, stage, endpoint, repo)) from err
    except (ValueError, TypeError):
        # Raised by huggingface_hub before any upload (invalid README.md metadata, bad arguments): already clear.
        raise
    except Exception as err:
        # Transport errors (refused connection, timeout, TLS) come from the HTTP client huggingface_hub uses.
        raise RMTKDHubError(_push_error_message(err, stage, endpoint, repo)) from err


def _push_error_message(err: Exception, stage: str, endpoint: str, repo_id: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        message = f"Authentication failed for {endpoint}: set `HF_TOKEN` or run `hf auth login`"
    elif status == 403:
        message = f"{endpoint} refused {stage}: the token has no write access to {repo_id!r}"
    elif isinstance(err, HfHubHTTPError):
        detail = err.server_message or str(err).splitlines()[0]
        message = f"{endpoint} answered HTTP {status} while {stage}: {detail}"
    else:
        message = f"Could not reach {endpoint} while {stage}: {type(err).__name__}: {err}"
    return f"{message.rstrip('.')}. Local files were left in place; pushing again is safe and uploads what is missing."


def _is_hub_id(value: str) -> bool:
    if Path(value).expanduser().exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _find_license(model_dir: Path, base_source: str) -> Optional[str]:
    for folder in (model_dir, Path(base_source).expanduser()):
        readme = folder / CARD_NAME
        if readme.is_file():
            license_id = ModelCard.load(readme, ignore_metadata_errors=True).data.license
            if license_id:
                return license_id
    return None


def _model_ref(base_model: Optional[str], base_source: str) -> str:
    if base_model is not None:
        return f"[{base_model}](https://huggingface.co/{base_model})"
    return f"a local model (`{Path(base_source).name}`)"


def _dataset_ref(datasets: Optional[list[str]], name: Optional[str]) -> str:
    if datasets:
        return ", ".join(f"[{dataset}](https://huggingface.co/datasets/{dataset})" for dataset in datasets)
    if name is not None:
        return f"a local dataset (`{Path(name).name}`)"
    return "the data given to the compressor"


def _existing_plots(model_dir: Path, sites: list[dict[str, Any]]) -> list[dict[str, str]]:
    plots, missing = [], []
    for site in sites:
        if site["plot"] is None:
            continue
        if not PurePosixPath(site["plot"]).is_absolute() and (model_dir / site["plot"]).is_file():
            plots.append({"site": site["name"], "path": site["plot"]})
        else:
            missing.append(site["plot"])
    if missing:
        logger.warning(f"Spectrum plots named in {REPORT_NAME} are missing from {model_dir} and left out: {missing}.")
    return plots


def _site_row(site: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": site["name"],
        "kind": site["kind"],
        "original_width": site["original_width"],
        "kept_width": site["kept_width"],
        "rank": site["rank"],
        "estimator": site["estimator"],
        "sigma2": f"{site['sigma2']:.4g}",
        "edge": f"{site['edge']:.4g}",
        "q": f"{site['q']:.4g}",
        "n_samples": f"{site['n_samples']:,}",
        "ks_distance": f"{site['ks_distance']:.3f}",
        "heavy_tailed": "yes" if site["heavy_tailed"] else "no",
    }


def _fmt_metric(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_bytes(size: Optional[int]) -> str:
    if size is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _demote_headings(markdown: str, levels: int) -> str:
    """Nest an embedded Markdown file under our section: drop its title (a leading `# ` heading, which would repeat
    the section's) and push the other ATX headings outside code fences down `levels` levels."""
    body = markdown.strip().splitlines()
    if body and re.match(r"#\s", body[0]):
        body = body[1:]
    lines, in_fence = [], False
    for line in "\n".join(body).strip().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and (heading := re.match(r"(#{1,6})\s", line)):
            line = "#" * min(6, len(heading.group(1)) + levels) + line[len(heading.group(1)):]
        lines.append(line)
    return "\n".join(lines)
