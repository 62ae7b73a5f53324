"""`rmtkd push`: upload an RMT-KD output folder to a Hub model repository, with its model card."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from optimum.commands.base import CommandInfo

from .base import COMMON_API_FLAGS, RMTKDBaseCommand, add_common_arguments, describe

EXAMPLES = """examples:
  rmtkd push minilm-rmtkd --hub-model-id me/minilm-rmtkd --benchmark bench
  HF_ENDPOINT=http://localhost:8080 rmtkd push minilm-rmtkd --hub-model-id me/minilm-rmtkd --private --no-onnx
"""


class PushCommand(RMTKDBaseCommand):
    COMMAND = CommandInfo(name="push", help="Push an output folder to the Hub with its model card.")
    API_FLAGS = {
        **COMMON_API_FLAGS, "model_dir": "folder", "save_directory": "--output", "repo_id": "--hub-model-id",
        "base_model=": "--base-model", "datasets=": "--datasets", "benchmark": "--benchmark",
        "revision": "--revision", "create_pr=True": "--create-pr", "include_onnx=False": "--no-onnx",
        "commit_message": "--commit-message", "token": "--token", "endpoint": "--endpoint",
    }

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        describe(
            parser,
            "Create the repository if needed and upload the folder; README.md is (re)written from "
            "rmtkd_report.json unless it is a card not written by optimum-rmtkd. Files identical to the remote "
            "ones are skipped, so running it again after a failure finishes the upload. Nothing local is changed "
            "apart from README.md.",
            EXAMPLES,
        )
        parser.add_argument("folder", help="A folder written by `rmtkd compress`.")
        parser.add_argument("--hub-model-id", default=None,
                            help="Repository, `namespace/name` (default: the folder's name under the token's user).")
        parser.add_argument("--private", action="store_true",
                            help="Create the repository as private; an existing one keeps its visibility "
                                 "(default: off).")
        parser.add_argument("--token", default=None,
                            help="Token with write access (default: HF_TOKEN, else the one of `hf auth login`).")
        parser.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT"),
                            help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co).")
        parser.add_argument("--benchmark", default=None, metavar="BENCHMARK_MD",
                            help="A benchmark.md, or the --output folder of `rmtkd benchmark`, whose table goes in "
                                 "the card (default: <folder>/benchmark.md when present).")
        parser.add_argument("--base-model", default=None,
                            help="Hub id of the uncompressed model for the card's metadata, needed when the report "
                                 "names a local folder (default: the report's base model when it is a Hub id).")
        parser.add_argument("--datasets", nargs="+", default=None, metavar="DATASET_ID",
                            help="Hub ids of the data for the card's metadata (default: the report's dataset when it "
                                 "is a Hub id).")
        parser.add_argument("--no-onnx", action="store_true",
                            help="Leave the onnx/ export out of the upload and of the card (default: include it).")
        parser.add_argument("--commit-message", default=None,
                            help="Commit message (default: a summary of the compression).")
        parser.add_argument("--revision", default=None,
                            help="Branch to push to, created from main if needed (default: main).")
        parser.add_argument("--create-pr", action="store_true",
                            help="Open a pull request against main instead of pushing to it (default: off).")
        add_common_arguments(parser)

    def execute(self) -> None:
        args = self.args
        from ..hub import push_to_hub

        repo_id = args.hub_model_id or Path(args.folder).resolve().name
        url = push_to_hub(
            args.folder, repo_id, private=args.private, token=args.token, endpoint=args.endpoint,
            commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr,
            include_onnx=not args.no_onnx, benchmark=args.benchmark, base_model=args.base_model,
            datasets=args.datasets,
        )
        print(f"Pushed {args.folder} to {url}")
