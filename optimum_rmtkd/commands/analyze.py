"""`rmtkd analyze`: every estimator's kept width at every site of a model, without changing the model."""
from __future__ import annotations

import argparse
import logging

from optimum.commands.base import CommandInfo

from ..utils.io import check_output_folder

from .base import (
    ANALYSIS_FIELDS,
    DATA_API_FLAGS,
    RMTKDBaseCommand,
    add_common_arguments,
    add_config_arguments,
    add_dataset_column_arguments,
    add_model_argument,
    check_dataset_source,
    clamp_max_length,
    config_from_args,
    describe,
    load_model_config,
    model_from_args,
    model_load_error,
    read_dataset_file,
    task_from_args,
)

EXAMPLES = """examples:
  rmtkd analyze ./minilm-sst2 --dataset train.csv
  rmtkd analyze -m ./minilm-sst2 --dataset train.csv --sample-unit cls --output minilm-spectra
  rmtkd analyze ./minilm-sst2 --dataset train.csv --preset paper      # the paper's estimator and site order
"""


class AnalyzeCommand(RMTKDBaseCommand):
    COMMAND = CommandInfo(name="analyze", help="Show the spectrum of every site and what each estimator would keep.")
    API_FLAGS = {**DATA_API_FLAGS, "output_dir": "--output"}

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        describe(
            parser,
            "Run the calibration pass of `compress` (same subset, same statistics) and fit all five estimators to "
            "each site's spectrum. Prints one row per site: width d, samples n, q = d/n, the configured estimator's "
            "σ² and bulk edge λ₊, the width each estimator would keep, the KS distance of the bulk to the fitted "
            "Marchenko-Pastur law, and whether the bulk is heavy-tailed. The model is not modified, and --output "
            "may be neither its folder, a parent of it nor a folder inside it.",
            EXAMPLES,
            usage="%(prog)s MODEL --dataset DATA [-o OUTPUT] [options]",
        )
        add_model_argument(parser)
        parser.add_argument("--dataset", required=True,
                            help="Data to calibrate on (a local csv/tsv/json/jsonl/parquet file, a folder or a Hub "
                                 "id); its --calibration-fraction is used, as in compress.")
        parser.add_argument("-o", "--output", default=None,
                            help="Folder for analysis.json and spectra/*.png; neither the model's folder, a parent "
                                 "of it nor a folder inside it (default: print the table only).")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty --output folder (default: off).")
        parser.add_argument("--no-plots", action="store_true",
                            help="Write analysis.json without the spectrum plots (default: plots on).")
        add_dataset_column_arguments(parser, labels=False)
        add_config_arguments(parser, ANALYSIS_FIELDS)
        add_common_arguments(parser)

    def execute(self) -> None:
        args = self.args
        model_id = model_from_args(args)
        check_dataset_source(args.dataset, "--dataset")
        if args.output is not None:
            # The output folder is replaced as a whole: it must hold neither the model nor the data.
            check_output_folder(args.output, [model_id], overwrite=args.overwrite, name="--output")
            check_output_folder(args.output, [args.dataset], overwrite=True, name="--output", what="dataset")
        config = config_from_args(args, ANALYSIS_FIELDS)

        # The registered rmtkd_<base> types, so that a per-layer folder (config and weights) loads too.
        from .. import modeling  # noqa: F401

        task = task_from_args(args, model_id)
        config = clamp_max_length(config, task, load_model_config(model_id))
        read_dataset_file(args.dataset, "--dataset")

        from ..analysis import analyze_model
        from ..compressor import RMTKDCompressor

        try:  # as compress loads it: a GGUF file dequantized, a new task head drawn under the seed
            loaded = RMTKDCompressor.from_pretrained(model_id, task=task, seed=config.seed)
        except OSError as error:
            raise model_load_error(model_id, error) from error
        model, preprocessor = loaded.model, loaded.preprocessor
        if not args.debug:
            # The table flags heavy-tailed sites and the analysis logs one summary; one warning per fit is noise.
            logging.getLogger("optimum_rmtkd.rmt").setLevel(logging.ERROR)
        analysis = analyze_model(
            model, preprocessor, task, args.dataset, config, text_column=args.text_column,
            text_pair_column=args.text_pair_column, image_column=args.image_column, source=model_id,
        )
        print(analysis.to_table())
        print()
        print(analysis.to_estimator_table())
        if analysis.allocation is not None:
            print()
            print(analysis.to_allocation_table())
        if args.output is not None:
            path = analysis.save(args.output, overwrite=args.overwrite, plots=not args.no_plots)
            print(f"Wrote {path}")
