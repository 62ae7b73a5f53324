"""Spectral analysis without compression: what each estimator would keep at every site of a model.

The estimators disagree widely on real activation spectra (DESIGN §1: on MiniLM the paper's rule kept about 10% of
each width, the debiased median about 40%), so a user should see all of them on their own model and data before
running `compress`. `analyze_model` runs the same calibration pass as `RMTKDCompressor.compress` (same calibration
subset, sample unit and statistics) and the same width decision (`optimum_rmtkd.widths.decide_widths`), then turns
every other estimator's rank into widths the same way (`widths_for_ranks`); the model is left untouched.

Example:

```python
>>> from transformers import AutoModelForSequenceClassification, AutoTokenizer
>>> from optimum_rmtkd.analysis import analyze_model
>>> model = AutoModelForSequenceClassification.from_pretrained("path/to/fine-tuned-bert")
>>> tokenizer = AutoTokenizer.from_pretrained("path/to/fine-tuned-bert")
>>> analysis = analyze_model(model, tokenizer, "text-classification", "train.csv")
>>> print(analysis.to_table())
>>> analysis.save("bert-analysis")  # analysis.json and spectra/*.png
```
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from torch import nn
from torch.utils.data import DataLoader
from transformers.utils import logging

from .adapters import get_adapter
from .calibration import collect_statistics, layerwise_layout
from .configuration import RMTKDConfig
from .data import DatasetLike, calibration_subset, load_split
from .report import SiteReport, save_spectrum_plots
from .rmt import ESTIMATORS
from .tasks import get_task
from .tasks.base import Columns, Task
from .utils.import_utils import is_matplotlib_available
from .utils.io import atomic_directory, atomic_write_json, check_output_folder
from .version import __version__
from .widths import Allocation, allocate_widths, decide_widths, widths_for_ranks

logger = logging.get_logger(__name__)

ANALYSIS_NAME = "analysis.json"


@dataclass
class RMTKDAnalysis:
    """Every site's spectrum fitted by every estimator, and the widths each would keep.

    Attributes:
        model_type (`str`): `config.model_type` of the analysed model.
        sites (`list[SiteReport]`): one report per site; `estimator`, `sigma2`, `edge`, `ks_distance` and
            `heavy_tailed` are those of `config.estimator`, `ranks_by_estimator` holds every estimator's rank and
            `kept_width` is the configured estimator's entry of `saved_widths`.
        asked_widths (`dict[str, dict[str, int]]`): site → estimator → the width the site's own spectrum asks for
            (the rank rounded up to `width_multiple`, at least `min_width`; a hidden width also keeps whole heads,
            see `RMTKDConfig.head_reduction`).
        saved_widths (`dict[str, dict[str, int]]`): site → estimator → the width `compress` would cut the site to
            in its first stage: the asked widths as `config.output_format` can hold them (the stock format gives
            every site of a config field the widest width asked among them).
        n_examples (`int`): calibration examples the statistics came from.
        config (`RMTKDConfig`): the settings used.
        source (`str`, *optional*): where the model came from, if known.
        allocation (`Allocation`, *optional*): with `config.target_reduction`, the widths that meet it with the
            spectra deciding where to cut (`allocate_widths`), and what a uniform cut would keep.
    """

    model_type: str
    sites: List[SiteReport]
    asked_widths: Dict[str, Dict[str, int]]
    saved_widths: Dict[str, Dict[str, int]]
    n_examples: int
    config: RMTKDConfig
    source: Optional[str] = None
    allocation: Optional[Allocation] = None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "model_type": self.model_type,
            "package_version": __version__,
            "calibration_examples": self.n_examples,
            "estimator": self.config.estimator,
            "output_format": self.config.output_format,
            "config": self.config.to_dict(),
            "sites": [
                dict(site.to_dict(), asked_widths=self.asked_widths[site.name],
                     saved_widths=self.saved_widths[site.name])
                for site in self.sites
            ],
            "allocation": None if self.allocation is None else self.allocation.to_dict(),
        }

    def to_table(self) -> str:
        """A plain-text table: one row per site with d, n, q, σ², λ₊ (of `config.estimator`), the width every
        estimator would cut it to (the configured one starred), the KS distance and the heavy-tail flag."""
        chosen = self.config.estimator
        header = ["site", "d", "n", "q", "σ²", "λ₊"]
        header += [f"{name}*" if name == chosen else name for name in ESTIMATORS]
        header += ["KS", "heavy-tailed"]
        rows = []
        for site in self.sites:
            saved, asked = self.saved_widths[site.name], self.asked_widths[site.name]
            rows.append(
                [site.name, str(site.original_width), str(site.n_samples), f"{site.q:.3g}", f"{site.sigma2:.3g}",
                 f"{site.edge:.3g}"]
                + [str(saved[name]) if saved[name] == asked[name] else f"{saved[name]} ({asked[name]})"
                   for name in ESTIMATORS]
                + [f"{site.ks_distance:.3f}", "yes" if site.heavy_tailed else "no"]
            )
        note = (
            f"* = the configured estimator ({chosen}); σ², λ₊ and KS are its values. Widths are those the "
            f"`{self.config.output_format}` format would be cut to in the first stage, rounded up to a multiple of "
            f"{self.config.width_multiple}; in parentheses, a site's own width where the format ties it to others."
        )
        return format_table(header, rows) + "\n" + note

    def to_allocation_table(self) -> str:
        """The size target's widths (`allocation`): each site's width with the spectra deciding, beside a uniform
        cut's to the same size, then the σ² scale found and the predicted parameter count."""
        allocation = self.allocation
        if allocation is None:
            return ""
        rows = [[site.name, str(site.original_width), str(allocation.widths[site.name]),
                 str(allocation.uniform_widths[site.name])] for site in self.sites]
        header = ["site", "d", f"width ({self.config.estimator}, σ² × {allocation.scale:.3g})",
                  f"uniform ({allocation.uniform_share:.0%} kept)"]
        return format_table(header, rows) + (
            f"\nTarget: −{self.config.target_reduction:.1%} of {allocation.original_parameters:,} parameters (at most "
            f"{allocation.target_parameters:,}); these widths leave {allocation.parameters:,} (−{allocation.reduction:.1%}), "
            f"in the `{self.config.output_format}` format."
        )

    def to_estimator_table(self) -> str:
        """A plain-text table: one row per site and estimator with d, n, that estimator's σ², λ₊ (its keep
        threshold) and rank k, and the width it would cut the site to, so the estimators can be compared side by side."""
        header = ["site", "d", "n", "estimator", "σ²", "λ₊", "k", "width"]
        rows = []
        for site in self.sites:
            for name in ESTIMATORS:
                fit = site.fits_by_estimator[name]
                rows.append([site.name, str(site.original_width), str(site.n_samples), name, f"{fit['sigma2']:.3g}",
                             f"{fit['edge']:.3g}", str(fit["rank"]), str(self.saved_widths[site.name][name])])
        return format_table(header, rows)

    def save(self, output_dir: Union[str, os.PathLike], overwrite: bool = False, plots: bool = True) -> Path:
        """Write `analysis.json` and, with matplotlib and `plots=True`, `spectra/<site>.png` into `output_dir`.

        The folder is written atomically; a non-empty `output_dir` is an error unless `overwrite=True`, and so is
        the analysed model's folder (`source`), a parent of it or a folder inside it, whatever `overwrite`.
        """
        check_output_folder(output_dir, [self.source], overwrite=overwrite, name="output_dir")
        data = self.to_dict()
        with atomic_directory(output_dir, overwrite=overwrite) as folder:
            if plots and is_matplotlib_available():
                save_spectrum_plots({site["name"]: site for site in data["sites"]}, folder, data)
            elif plots:
                logger.warning("matplotlib is not installed: no spectrum plots (`pip install matplotlib`).")
            atomic_write_json(folder / ANALYSIS_NAME, data)
        return Path(output_dir) / ANALYSIS_NAME


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table: a rule under the header, the first column left-aligned and the others right-aligned."""
    cells = [[str(cell) for cell in header]] + [[str(cell) for cell in row] for row in rows]
    sizes = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(size) if i == 0 else cell.rjust(size) for i, (cell, size) in enumerate(zip(row, sizes)))
        .rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * size for size in sizes))
    return "\n".join(lines)


def analyze_model(
    model: nn.Module,
    preprocessor: Any,
    task: Union[str, Task],
    dataset: DatasetLike,
    config: Optional[RMTKDConfig] = None,
    *,
    text_column: str = "text",
    text_pair_column: Optional[str] = None,
    image_column: str = "image",
    source: Optional[str] = None,
) -> RMTKDAnalysis:
    """Calibrate `model` on `dataset` and fit every estimator to the spectrum of each site; `model` is not changed.

    Args:
        model (`transformers.PreTrainedModel`): a model an adapter supports (see `optimum_rmtkd.adapters`).
        preprocessor: its tokenizer (or image processor).
        task (`str` or `Task`): the task, see `optimum_rmtkd.tasks`.
        dataset: a `datasets.Dataset`, a local csv/json/parquet file or a dataset id (its `train` split). As in
            `compress`, a `config.calibration_fraction` share of it, at most `config.max_calibration_examples`
            examples, is used, so n (hence q and the bulk edge) is what `compress` would see on the same split.
        config (`RMTKDConfig`, *optional*): `sites`, the estimator and its parameters, `sample_unit`, `centered`,
            `max_length`, `batch_size`, width rounding, `output_format`, `target_reduction` (the widths that would
            meet it, `RMTKDAnalysis.allocation`) and `seed` are read from it.
        text_column / text_pair_column / image_column: the dataset's input column names; labels are not needed.
        source (`str`, *optional*): the model's path or Hub id, recorded in the result.

    Returns:
        `RMTKDAnalysis`.
    """
    config = config or RMTKDConfig()
    task = get_task(task)
    adapter = get_adapter(model)
    groups = adapter.stages(model, config)
    sites = [site for group in groups for site in group]
    columns = Columns(text=text_column, text_pair=text_pair_column, image=image_column, label=None)
    data = load_split(dataset, "train", name="dataset")
    # The same seeded subset `compress` draws (it shuffles the tokenised split, which has the same rows and order).
    subset = calibration_subset(data, config.calibration_fraction, config.max_calibration_examples, config.seed)
    inputs = task.inputs(subset, preprocessor, columns, config.max_length, "dataset")
    loader = DataLoader(inputs.with_format("torch"), batch_size=config.batch_size,
                        collate_fn=task.collator(preprocessor))
    # Only the spectra are needed (and, for a size target, what the parameter count of a cut reads): what `reduce`
    # would also read (`reader_inputs`, `extra_captures`) is otherwise skipped.
    if config.target_reduction is not None:
        points = adapter.required_captures(sites)
    else:
        points = list({point.key: point for site in sites for point in site.captures}.values())
    stats = collect_statistics(model, loader, points, sample_unit=config.sample_unit,
                               forward_kwargs=task.forward_kwargs(),
                               layerwise=layerwise_layout(adapter, model, config))

    reports: List[SiteReport] = []
    asked: Dict[str, Dict[str, int]] = {site.name: {} for site in sites}
    saved: Dict[str, Dict[str, int]] = {site.name: {} for site in sites}
    for group in groups:
        # The configured estimator's decision, as `compress` makes it; its reports carry every estimator's rank,
        # which become widths the same way (the eigendecomposition and fits are not repeated).
        decision = decide_widths(adapter, model, group, stats, config)
        reports += [decision.reports[site.name] for site in group]
        for name in ESTIMATORS:
            ranks = {site.name: decision.reports[site.name].ranks_by_estimator[name] for site in group}
            asked_widths, widths = widths_for_ranks(adapter, model, group, ranks, config)
            for site in group:
                asked[site.name][name], saved[site.name][name] = asked_widths[site.name], widths[site.name]
    heavy = [report.name for report in reports if report.heavy_tailed]
    if heavy:
        logger.warning(
            "%d of %d sites have a heavy-tailed bulk under `%s` (KS above the limit): the Marchenko-Pastur null is a "
            "weak model there, so compare the estimators' widths before choosing one.", len(heavy), len(reports),
            config.estimator,
        )
    allocation = None
    if config.target_reduction is not None:
        allocation = allocate_widths(adapter, model, stats, config, config.target_reduction)
    return RMTKDAnalysis(
        model_type=model.config.model_type, sites=reports, asked_widths=asked, saved_widths=saved,
        n_examples=len(subset), config=config, source=source, allocation=allocation,
    )
