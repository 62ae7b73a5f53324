"""Write a compressed model folder atomically (stock or registered per-layer format) and read checkpoints back.

A stage checkpoint is a model folder plus what a resumed run needs to continue exactly as the uninterrupted run
would: the random states of each process (`save_random_states`), and the fingerprints of the input model's weights
and of the data rows (`weights_fingerprint`, `rows_fingerprint`) that say whose run it is.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .configuration import CONFIG_NAME
from .report import REPORT_NAME
from .utils.io import atomic_directory, atomic_write_bytes, atomic_write_json
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


def check_builds(model: nn.Module) -> None:
    """The saved config must build the model's class again: the stock classes check some shapes only when a model
    is built (BERT's `hidden % heads` in its attention), so build one on the meta device (no memory, no weights)
    before anything is written."""
    try:
        with torch.device("meta"):
            type(model)(copy.deepcopy(model.config))
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"The compressed config does not build {type(model).__name__} ({' '.join(str(error).split())}); the "
            "adapter's width rounding should prevent this: please report it."
        ) from error


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
    check_builds(model)
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


# --- what a checkpoint must match, and the random states that continue it -------------------------------------------
_ROWS_PER_BATCH = 4096


def weights_fingerprint(model: nn.Module) -> str:
    """BLAKE2b of a model's state dict: each tensor's name, dtype, shape and bytes, in sorted name order.

    Two models with the same architecture and tensors get the same digest, whatever their files or the path they
    came from; any changed weight changes it. About a second per GB of weights (one CPU copy of one tensor at a time).
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        # Viewed as bytes, every dtype (bfloat16 too) hashes without a conversion.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _update_with_array(digest, array) -> None:
    """Feed one Arrow column to `digest`: list lengths then values for nested types, raw numbers for numeric ones."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        for chunk in array.chunks:
            _update_with_array(digest, chunk)
        return
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        digest.update(np.ascontiguousarray(pc.list_value_length(array).fill_null(-1).to_numpy()))
        _update_with_array(digest, array.flatten())  # `flatten` honours slices, unlike `.values`
    elif pa.types.is_struct(kind):
        for child in array.flatten():
            _update_with_array(digest, child)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        digest.update(np.ascontiguousarray(array.to_numpy(zero_copy_only=False)))
    else:  # strings, dates, …: rare in prepared data, exact through their JSON form
        digest.update(json.dumps(array.to_pylist(), default=str).encode())


def rows_fingerprint(dataset) -> str:
    """BLAKE2b of a `datasets.Dataset`'s rows as the model sees them (column names, types and values, in order).

    Computed on the prepared data (token ids, labels, pixels), so the same rows give the same digest whether they came
    from a file, the Hub or memory; `Dataset._fingerprint` does not (it is random for in-memory data and follows
    the transforms applied, not the content).
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([[name, str(kind)] for name, kind in dataset.features.items()]).encode())
    for batch in dataset.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
        for name in batch.column_names:
            _update_with_array(digest, batch.column(name))
    return digest.hexdigest()


def capture_random_states(generators: Mapping[str, torch.Generator]) -> Dict[str, Any]:
    """The states of every random number generator a run draws from: Python's `random`, NumPy's global one,
    PyTorch's CPU (and CUDA) default generators and the given ones (e.g. a shuffling `DataLoader`'s)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),
        # Plain lists, so that `torch.load(weights_only=True)` reads them back.
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "generators": {key: generator.get_state() for key, generator in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put back what `capture_random_states` took; `generators` are the same kinds of generators, by the same keys."""
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    for key, generator in generators.items():
        generator.set_state(states["generators"][key])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_random_states(path: Path, states: Mapping[str, Any]) -> None:
    """Write `states` (tensors, numbers, strings, lists and dicts) atomically with `torch.save`."""
    buffer = io.BytesIO()
    torch.save(dict(states), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_random_states(path: Path) -> Dict[str, Any]:
    """Read what `save_random_states` wrote (`weights_only`: no code is run from the file)."""
    return torch.load(path, weights_only=True)
