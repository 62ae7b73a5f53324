"""Write a compressed model folder atomically (stock or registered per-layer format) and read checkpoints back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from torch import nn

from .configuration import CONFIG_NAME
from .report import REPORT_NAME
from .utils.io import atomic_directory, atomic_write_json
from .version import __version__

MODELING_FILE = "modeling_rmtkd.py"
_MODELING_SOURCE = '''"""Remote-code entry point of an optimum-rmtkd per-layer model (needs `pip install optimum-rmtkd`)."""
from optimum_rmtkd.modeling import per_layer_classes_for

{config_name}, {model_name} = per_layer_classes_for("{base_type}", "{architecture}")
'''


def weights_size(folder) -> Optional[int]:
    """Bytes of the weight files (safetensors or PyTorch bins) in a local model folder; `None` when not local."""
    if folder is None or not Path(folder).is_dir():
        return None
    files = [*Path(folder).glob("*.safetensors"), *Path(folder).glob("pytorch_model*.bin")]
    return sum(f.stat().st_size for f in files) if files else None


def check_stock_shapes(config) -> None:
    """The stock architecture only checks `hidden % heads` when built: check it before anything is written."""
    hidden = getattr(config, "hidden_size", getattr(config, "dim", None))
    heads = getattr(config, "num_attention_heads", getattr(config, "n_heads", None))
    if hidden is not None and heads and hidden % heads:
        raise ValueError(
            f"The hidden width {hidden} is not divisible by the {heads} attention heads; round widths with "
            "`num_heads` (this is a bug if it came from RMTKDCompressor)."
        )


def _rmtkd_block(report: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "version": __version__,
        "base_model": report.get("base_model"),
        "output_format": report.get("output_format"),
        "parameters": report.get("parameters"),
        "sites": {
            site["name"]: {
                key: site[key]
                for key in ("original_width", "kept_width", "rank", "estimator", "sigma2", "edge", "q", "n_samples")
            }
            for site in report.get("sites", [])
        },
    }


def _write_per_layer_config(folder: Path) -> None:
    """Turn the saved config into the registered `rmtkd_<base>` type of the saved architecture (stock or already
    registered), with an `auto_map` naming the Auto class of its task, and write the remote-code module beside it."""
    from .modeling.per_layer import registered_config_dict, registered_type_for

    config_path = folder / "config.json"
    data = json.loads(config_path.read_text())
    base_type = data["model_type"].removeprefix("rmtkd_")
    architecture = (data.get("architectures") or [None])[0]
    registered = registered_type_for(base_type, architecture)
    data = registered_config_dict(data, registered)
    data["auto_map"] = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.{registered.config.__name__}",
        registered.auto_model.__name__: f"{MODELING_FILE[:-3]}.{registered.model.__name__}",
    }
    atomic_write_json(config_path, data)
    (folder / MODELING_FILE).write_text(
        _MODELING_SOURCE.format(config_name=registered.config.__name__, model_name=registered.model.__name__,
                                base_type=base_type, architecture=registered.stock_model.__name__)
    )


def save_compressed_model(
    model: nn.Module,
    tokenizer,
    directory: Path,
    output_format: str,
    *,
    overwrite: bool = False,
    config=None,
    report: Optional[Dict[str, Any]] = None,
    plots: Optional[Callable[[Path], None]] = None,
) -> None:
    """Save weights, config (with the `rmtkd` block), tokenizer, run config, report and plots in one atomic step."""
    check_stock_shapes(model.config)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        if report is not None:
            model.config.rmtkd = _rmtkd_block(report)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if output_format == "per-layer":
            _write_per_layer_config(tmp)
        if config is not None:
            config.to_json_file(tmp / CONFIG_NAME)
        if plots is not None:
            plots(tmp)
        if report is not None:
            report.setdefault("size_bytes", {})["compressed"] = weights_size(tmp)
            atomic_write_json(tmp / REPORT_NAME, report)


def load_checkpoint(path: Path, auto_model) -> nn.Module:
    """Load a stage checkpoint (either format) with the task's Auto class (per-layer types are registered)."""
    return auto_model.from_pretrained(path)
