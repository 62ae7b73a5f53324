"""Registers `optimum-cli rmtkd` (optimum-cli imports every module of this namespace and reads REGISTER_COMMANDS).

No `__init__.py` may exist anywhere under `optimum/` (PEP 420 namespace shared with optimum and its subpackages).
"""
from optimum_rmtkd.commands.rmtkd_cli import RMTKDCommand

REGISTER_COMMANDS = [RMTKDCommand]
