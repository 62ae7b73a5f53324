"""`rmtkd compress`: run `RMTKDCompressor` on a model and a dataset, save the result, optionally push it."""
from __future__ import annotations

import argparse
from pathlib import Path

from optimum.commands.base import CommandInfo

from ..utils.io import check_output_folder

from .base import (
    DATA_API_FLAGS,
    RMTKDBaseCommand,
    add_common_arguments,
    add_config_arguments,
    add_dataset_column_arguments,
    add_model_argument,
    check_dataset_source,
    check_num_labels,
    clamp_max_length,
    config_from_args,
    defaults_text,
    describe,
    load_model_config,
    model_from_args,
    model_load_error,
    read_dataset_file,
    task_from_args,
)

DEFAULTS_TEXT = defaults_text()

EXAMPLES = """examples:
  rmtkd compress ./minilm-sst2 --dataset train.csv --eval-dataset validation.csv -o minilm-rmtkd
  rmtkd compress -m ./minilm-sst2 --dataset train.csv --target-reduction 0.3 -o out
  rmtkd compress ./minilm-sst2 --dataset train.csv --preset paper --quantile 0.7 -o out-paper
  optimum-cli rmtkd compress ./minilm-sst2 --dataset train.csv --config rmtkd_config.json -o out --push-to-hub
"""


class CompressCommand(RMTKDBaseCommand):
    COMMAND = CommandInfo(name="compress", help="Compress a model with RMT-KD and save it (optionally push it).")
    API_FLAGS = {
        **DATA_API_FLAGS,
        "save_directory": "--output",
        "model_dir": "--output",
        "num_labels": "--num-labels",
        "resume=False": "--no-resume",
        "base_model=": "--base-model",
        "repo_id": "--hub-model-id",
    }

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        describe(
            parser,
            "Calibrate, cut every site to the directions above its Marchenko-Pastur bulk, and self-distil, stage "
            "after stage, until a stop rule fires. The output folder reloads with the stock AutoModelFor* class "
            "(or after `import optimum_rmtkd.modeling` for --output-format per-layer) and holds rmtkd_config.json, "
            "rmtkd_report.json and the spectra plots. An interrupted run resumes from <output>.checkpoints.\n\n"
            f"Defaults: {DEFAULTS_TEXT}: FFN sites before the hidden width, and a stage that costs more than "
            "--max-metric-drop is undone and the next one runs: the recipe of this project's BERT benchmarks (README, "
            "Results). The paper's recipe, --preset paper (estimator paper, hidden width first, stop at the first "
            "such stage), cut the hidden width first on a new task, lost accuracy, undid that stage and stopped with "
            "0% fewer parameters.",
            EXAMPLES,
            usage="%(prog)s MODEL --dataset DATA -o OUTPUT [options]",
        )
        add_model_argument(parser)
        parser.add_argument("-o", "--output", required=True,
                            help="Folder to write the compressed model to; neither the model's folder, a parent of it "
                                 "nor a folder inside it.")
        parser.add_argument("--overwrite", action="store_true",
                            help="Replace a non-empty --output folder (default: off).")
        parser.add_argument("--no-resume", dest="resume", action="store_false",
                            help="Start from scratch even if <output>.checkpoints holds a run with the same "
                                 "settings (default: resume).")
        parser.add_argument("--num-labels", type=int, default=None,
                            help="Classes of a new task head, for a checkpoint without one (default: the model's, "
                                 "or 2 for a new head).")
        data = parser.add_argument_group("datasets (a local csv/tsv/json/jsonl/parquet file, a folder or a Hub id)")
        data.add_argument("--dataset", required=True,
                          help="Training data: distillation, and its --calibration-fraction for the spectra.")
        data.add_argument("--eval-dataset", "--validation-file", dest="eval_dataset", default=None,
                          help="Validation data watched by the stop rules (default: 10%% held out of --dataset).")
        data.add_argument("--test-dataset", default=None,
                          help="Held-out data scored before and after compression for the report (default: none).")
        data.add_argument("--calibration-dataset", default=None,
                          help="Data for the spectra instead of the --dataset subset (default: none).")
        add_dataset_column_arguments(parser)
        add_config_arguments(parser)
        hub = parser.add_argument_group("Hub")
        hub.add_argument("--push-to-hub", action="store_true",
                         help="Push the output folder with its model card when done; token and endpoint come from "
                              "HF_TOKEN (or `hf auth login`) and HF_ENDPOINT (default: off).")
        hub.add_argument("--hub-model-id", default=None,
                         help="Repository to push to, `namespace/name` (default: the output folder's name under "
                              "the token's user).")
        hub.add_argument("--private", action="store_true", help="Create the repository as private (default: off).")
        hub.add_argument("--base-model", default=None,
                         help="Hub id of the uncompressed model for the card's metadata, when MODEL is a local folder "
                              "(default: MODEL when it is a Hub id, else none).")
        add_common_arguments(parser)

    def execute(self) -> None:
        args = self.args
        model = model_from_args(args)
        data = (("--dataset", args.dataset), ("--eval-dataset", args.eval_dataset),
                ("--test-dataset", args.test_dataset), ("--calibration-dataset", args.calibration_dataset))
        for flag, source in data:
            check_dataset_source(source, flag)
        # The output folder is replaced as a whole: it must hold neither the model nor the data.
        check_output_folder(args.output, [model], overwrite=args.overwrite, name="--output")
        datasets = (args.dataset, args.eval_dataset, args.test_dataset, args.calibration_dataset)
        check_output_folder(args.output, datasets, overwrite=True, name="--output", what="dataset")
        if args.hub_model_id is not None and not args.push_to_hub:
            raise ValueError("`--hub-model-id` was given without `--push-to-hub`; add `--push-to-hub` to push.")
        config = config_from_args(args)

        # The registered rmtkd_<base> types, so that a per-layer folder (config and weights) loads too.
        from .. import modeling  # noqa: F401

        task = task_from_args(args, model)
        # What config.json says is checked before the weights load: a trained head's label count, the input limit.
        model_config = load_model_config(model)
        check_num_labels(args.num_labels, model_config)
        config = clamp_max_length(config, task, model_config)
        for flag, source in data:
            read_dataset_file(source, flag)

        from ..analysis import format_table
        from ..compressor import RMTKDCompressor

        try:
            compressor = RMTKDCompressor.from_pretrained(model, task=task, num_labels=args.num_labels,
                                                         seed=config.seed)
        except OSError as error:
            raise model_load_error(model, error) from error
        result = compressor.compress(
            args.dataset,
            eval_dataset=args.eval_dataset,
            config=config,
            save_directory=args.output,
            calibration_dataset=args.calibration_dataset,
            test_dataset=args.test_dataset,
            text_column=args.text_column,
            text_pair_column=args.text_pair_column,
            image_column=args.image_column,
            label_column=args.label_column,
            overwrite=args.overwrite,
            resume=args.resume,
        )
        report = result.report
        parameters, metrics = report["parameters"], report["metrics"]
        print(f"Saved the compressed model to {result.save_directory}")
        print(f"parameters: {parameters['original']:,} -> {parameters['compressed']:,} "
              f"({parameters['reduction']:.1%} fewer)")
        print(f"{report['metric_name']} ({metrics['evaluated_on']}): {metrics['original']:.4f} -> "
              f"{metrics['compressed']:.4f}")
        print(f"stopped: {report['stop_reason']}")
        rows = [[site["name"], site["kind"], site["original_width"], site["kept_width"], site["rank"],
                 "yes" if site["heavy_tailed"] else "no"] for site in report["sites"]]
        if rows:
            print(format_table(["site", "kind", "width", "kept", f"rank ({config.estimator})", "heavy-tailed"], rows))

        if args.push_to_hub:
            from ..hub import RMTKDHubError, push_to_hub

            repo_id = args.hub_model_id or Path(args.output).resolve().name
            try:
                url = push_to_hub(result.save_directory, repo_id, private=args.private, base_model=args.base_model)
            except RMTKDHubError as error:
                # The compression is done and saved: say so, and how to push without compressing again.
                raise RMTKDHubError(
                    f"{error} The compressed model is saved in {result.save_directory}; push it with "
                    f"`rmtkd push {result.save_directory} --hub-model-id {repo_id}`."
                ) from error
            print(f"Pushed to {url}")
