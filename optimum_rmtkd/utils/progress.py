"""One rule for showing progress bars: transformers' global switch, and only on the local main process."""
from __future__ import annotations


def progress_bars_enabled(accelerator=None) -> bool:
    """`False` when the user turned bars off (`transformers.utils.logging.disable_progress_bar()`, the CLI's
    `--quiet`) or when this is not the local main process."""
    # Imported here so that importing this module stays light.
    from transformers.utils import logging

    if not logging.is_progress_bar_enabled():
        return False
    return accelerator is None or accelerator.is_local_main_process
