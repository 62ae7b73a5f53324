"""Self-distillation with Accelerate: L = α·CE(y, p_new) + (1 − α)·T²·KL(p_old ‖ p_new) (paper §II)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.utils import logging

from .configuration import RMTKDConfig
from .utils.progress import progress_bars_enabled

logger = logging.get_logger(__name__)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    alpha: float = 0.7,
    temperature: float = 1.0,
) -> torch.Tensor:
    """α·CE(labels, student) + (1 − α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)); plain CE without a teacher.

    The T² factor keeps the KL gradients on the CE scale when T > 1 (Hinton et al., 2015).
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    if teacher_logits is None or alpha == 1.0:
        return ce
    log_p_new = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_old = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_new, log_p_old, log_target=True, reduction="batchmean")
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def accuracy(predictions: List[int], references: List[int]) -> Dict[str, float]:
    """Accuracy computed locally (`evaluate.load("accuracy")` fetches its script from the Hub)."""
    if not references:
        raise ValueError("Cannot compute a metric on an empty evaluation set.")
    correct = sum(int(p == r) for p, r in zip(predictions, references))
    return {"accuracy": correct / len(references)}


def resolve_metric(metric) -> Callable[[List[int], List[int]], float]:
    """Accept `None` (accuracy), an `evaluate.EvaluationModule`, or a callable `(predictions, references)`.

    Whatever it returns (a number or a dict of numbers), the first value is the metric the stop rules watch.
    """
    if metric is None:
        metric = accuracy
    compute = getattr(metric, "compute", None)
    if compute is None and not callable(metric):
        raise TypeError(
            f"`metric` must be an `evaluate.EvaluationModule` or a callable (predictions, references), got {type(metric).__name__}."
        )

    def score(predictions: List[int], references: List[int]) -> float:
        result = compute(predictions=predictions, references=references) if compute else metric(predictions, references)
        if isinstance(result, dict):
            result = next(iter(result.values()))
        return float(result)

    return score


@torch.no_grad()
def evaluate_model(model: nn.Module, dataloader: DataLoader, accelerator: Accelerator, metric) -> float:
    """Argmax predictions gathered across processes (`gather_for_metrics` drops the padding duplicates)."""
    score = resolve_metric(metric)
    was_training = model.training
    model.eval()
    predictions: List[int] = []
    references: List[int] = []
    for batch in dataloader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        preds, refs = accelerator.gather_for_metrics((logits.argmax(dim=-1), labels))
        predictions.extend(preds.tolist())
        references.extend(refs.tolist())
    model.train(was_training)
    return score(predictions, references)


def train(
    model: nn.Module,
    dataloader: DataLoader,
    accelerator: Accelerator,
    config: RMTKDConfig,
    *,
    teacher: Optional[nn.Module] = None,
    epochs: float,
    description: str = "Distilling",
    stop_check: Optional[Callable[[nn.Module], bool]] = None,
) -> nn.Module:
    """Train `model` for `epochs` (capped by `config.max_distillation_steps`) and return the unwrapped model.

    With a `teacher` the loss is the RMT-KD self-distillation loss; without one it is plain cross-entropy (the
    pre-compression fine-tuning). `stop_check`, when given, is called after each epoch and ends training early
    when it returns `True` (the paper's "train until validation accuracy exceeds a threshold").
    """
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)],
         "weight_decay": config.weight_decay},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
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
                labels = batch.pop("labels")
                logits = model(**batch).logits
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(**batch).logits
                loss = distillation_loss(logits, teacher_logits, labels, config.alpha, config.temperature)
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
