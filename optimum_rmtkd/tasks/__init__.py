"""The task registry: `get_task(name_or_config)` is the one lookup of a task, by name or from a model's config.

Importing this package is light (no torch, no transformers): the CLI lists the task names for `--task` without
loading any task. The built-in tasks are imported on first use; `register_task` adds a user's own `Task`.

Example:

```python
>>> from optimum_rmtkd.tasks import get_task, register_task
>>> get_task("text-classification").auto_model_name
'AutoModelForSequenceClassification'
>>> register_task(MyRegressionTask())  # a `optimum_rmtkd.tasks.base.Task` subclass
```
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Union

if TYPE_CHECKING:
    from .base import Task

# Built-in tasks: name -> "module:class", imported when first asked for.
_BUILTIN = {
    "text-classification": "sequence_classification:SequenceClassificationTask",
    "image-classification": "image_classification:ImageClassificationTask",
    "text-generation": "causal_lm:CausalLMTask",
}
# When a config names no known architecture (a bare encoder such as a sentence-transformer), the task it defaults to.
DEFAULT_TASK = "text-classification"
_REGISTRY: Dict[str, "Task"] = {}


def register_task(task: "Task", *, overwrite: bool = False) -> "Task":
    """Add a `Task` instance under `task.name` (refusing a name already taken unless `overwrite`); returns it."""
    from .base import Task

    if not isinstance(task, Task):
        raise TypeError(f"`task` must be an instance of `optimum_rmtkd.tasks.base.Task`, got {type(task).__name__}.")
    if not overwrite and task.name in task_names():
        raise ValueError(f"A task named {task.name!r} is already registered; pass `overwrite=True` to replace it.")
    _REGISTRY[task.name] = task
    return task


def task_names() -> List[str]:
    """Every task name, built-in and registered (cheap: imports no task)."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def _load(name: str) -> "Task":
    if name not in _REGISTRY:
        module, _, cls = _BUILTIN[name].partition(":")
        _REGISTRY[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return _REGISTRY[name]


def get_task(name_or_config: Union[str, "Task", Mapping[str, Any], Any]) -> "Task":
    """The task of a name, or of a model config (a `PretrainedConfig` or a `config.json` dict).

    A config is matched on its `architectures` (`*ForSequenceClassification` → `text-classification` …), then on
    each task's own rule (a config with `num_channels` is an image model); a config that names no task head (a bare
    encoder) gets `DEFAULT_TASK`, whose head the compressor then adds and trains.
    """
    from .base import Task

    if isinstance(name_or_config, Task):
        return name_or_config
    if isinstance(name_or_config, str):
        if name_or_config not in task_names():
            raise ValueError(
                f"`task` must be one of {', '.join(map(repr, task_names()))}, got {name_or_config!r}; add a task with "
                "`optimum_rmtkd.tasks.register_task`."
            )
        return _load(name_or_config)
    config = name_or_config if isinstance(name_or_config, Mapping) else name_or_config.to_dict()
    tasks = [_load(name) for name in task_names()]
    architectures = config.get("architectures") or ()
    for task in tasks:  # a task head named in `architectures` wins over any other rule
        if any(arch.endswith(task.architecture_suffixes) for arch in architectures):
            return task
    for task in tasks:
        if task.matches(config):
            return task
    return _load(DEFAULT_TASK)


__all__ = ["DEFAULT_TASK", "get_task", "register_task", "task_names"]
