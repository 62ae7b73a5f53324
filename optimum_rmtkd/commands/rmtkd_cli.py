"""The `rmtkd` command group: `optimum-cli rmtkd <verb>` (through the register module) and the `rmtkd` script.

Both build the same command classes, so flags, help and errors are identical; the script is for environments
where optimum-cli's plugin discovery is not wanted, and exits with the command's status code.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo, RootOptimumCLICommand

from ..version import __version__
from .analyze import AnalyzeCommand
from .base import describe
from .benchmark import BenchmarkCommand
from .compress import CompressCommand
from .export import ExportCommand
from .push import PushCommand

VERBS = (CompressCommand, AnalyzeCommand, ExportCommand, BenchmarkCommand, PushCommand)
DESCRIPTION = (
    "RMT-KD: compress Hugging Face models by keeping the activation directions above the Marchenko-Pastur bulk "
    "and self-distilling. `<command> --help` lists each command's flags."
)


class RMTKDCommand(BaseOptimumCLICommand):
    """`optimum-cli rmtkd`: prints its help; the verbs do the work."""

    COMMAND = CommandInfo(name="rmtkd", help="Compress models with RMT-KD, analyse spectra, export, benchmark, push.")
    SUBCOMMANDS = tuple(CommandInfo(verb.COMMAND.name, verb.COMMAND.help, subcommand_class=verb) for verb in VERBS)

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        describe(parser, DESCRIPTION)
        add_version_argument(parser)


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    """`--version`: prints `optimum-rmtkd <version>` and exits."""
    parser.add_argument("--version", action="version", version=f"optimum-rmtkd {__version__}",
                        help="Print the version of optimum-rmtkd and exit.")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `rmtkd` console script; returns the exit status (errors exit through `SystemExit`)."""
    root = RootOptimumCLICommand("rmtkd")
    describe(root.parser, DESCRIPTION)
    add_version_argument(root.parser)
    for info in RMTKDCommand.SUBCOMMANDS:
        root.register_subcommand(info)
    args = root.parser.parse_args(argv)
    if not hasattr(args, "func"):
        root.parser.print_help()
        return 2
    args.func(args).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
