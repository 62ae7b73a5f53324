"""Registers `optimum-cli rmtkd` (optimum-cli imports every module of this namespace and reads REGISTER_COMMANDS).

No `__init__.py` may exist anywhere under `optimum/` (PEP 420 namespace shared with optimum and its subpackages).
optimum-cli imports this module for every command, so it must stay light: it loads neither torch nor transformers
(checked by `tests/test_cli_imports.py`).
"""
from optimum_rmtkd.commands.rmtkd_cli import RMTKDCommand

REGISTER_COMMANDS = [RMTKDCommand]
