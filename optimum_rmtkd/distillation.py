"""Self-distillation with Accelerate: L = α·(task loss) + (1 − α)·T²·KL(p_old ‖ p_new) (paper §II).

A plain Accelerate loop; the loss comes from the task (`Task.loss`), so the loop knows no labels or logits.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging

from .configuration import RMTKDConfig
from .utils.progress import progress_bars_enabled

if TYPE_CHECKING:
    from .tasks.base import Task

logger = logging.get_logger(__name__)


def train(
    model: nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    config: RMTKDConfig,
    task: "Task",
    *,
    teacher: Optional[nn.Module] = None,
    epochs: float,
    description: str = "Distilling",
    stop_check: Optional[Callable[[nn.Module], bool]] = None,
) -> nn.Module:
    """Train `model` for `epochs` (capped by `config.max_distillation_steps`) and return the unwrapped model.

    With a `teacher` the loss is the task's RMT-KD self-distillation loss; without one it is the task loss alone (the
    pre-compression fine-tuning). `stop_check`, when given, is called after each epoch and ends training early
    when it returns `True` (the paper's "train until validation accuracy exceeds a threshold").
    """
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=task.learning_rate(config.learning_rate))
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)
    # Counted on the prepared loader: each process sees 1/num_processes of the batches. Accelerate's wrapped
    # scheduler advances num_processes steps per optimizer step, so its horizon is the steps of all processes.
    steps_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    total_steps = max(1, math.ceil(steps_per_epoch * epochs))
    if config.max_distillation_steps is not None and teacher is not None:
        total_steps = min(total_steps, config.max_distillation_steps)
    schedule_steps = total_steps * accelerator.num_processes
    scheduler = accelerator.prepare_scheduler(
        get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * schedule_steps), schedule_steps)
    )
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()

    model.train()
    step, done = 0, False
    progress = tqdm(total=total_steps, desc=description, disable=not progress_bars_enabled(accelerator), leave=False)
    while not done:
        for batch in dataloader:
            with accelerator.accumulate(model):
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                outputs = model(**inputs, **task.forward_kwargs())
                teacher_outputs = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_outputs = teacher(**inputs, **task.forward_kwargs())
                loss = task.loss(outputs, teacher_outputs, batch, config.alpha, config.temperature)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                if step >= total_steps:
                    done = True
                    break
        if not done and stop_check is not None and stop_check(model):
            break
    progress.close()
    logger.info("%s: %d optimizer steps, last loss %.4f", description, step, loss.item())
    # Drop Accelerate's autocast wrapper: later calibration and the returned model must run in full precision.
    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    accelerator.free_memory()
    return unwrapped
