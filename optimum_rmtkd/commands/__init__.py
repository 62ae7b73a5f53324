"""Command-line interface: one class per verb, shared by `optimum-cli rmtkd` and the `rmtkd` script.

Only argument parsing lives at module level; each command imports torch, transformers and the rest of
optimum_rmtkd inside `execute()`.
"""
from .analyze import AnalyzeCommand
from .benchmark import BenchmarkCommand
from .compress import CompressCommand
from .export import ExportCommand
from .push import PushCommand
from .rmtkd_cli import RMTKDCommand, main

__all__ = ["AnalyzeCommand", "BenchmarkCommand", "CompressCommand", "ExportCommand", "PushCommand", "RMTKDCommand",
           "main"]
