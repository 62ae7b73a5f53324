"""The CLI starts without torch or transformers: optimum-cli imports every plugin's register module for every command.

Each check runs in a fresh interpreter (the test process has long imported both through the fixtures), and prints
which of the heavy modules it ended up with.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optimum_rmtkd import __version__
from optimum_rmtkd.commands.base import CONFIG_FLAGS
from optimum_rmtkd.commands.rmtkd_cli import RMTKDCommand
from optimum_rmtkd.configuration import (
    CHANNEL_SELECTIONS,
    ESTIMATORS,
    HEAD_REDUCTIONS,
    HIDDEN_CUTS,
    METRIC_DROP_ACTIONS,
    MIXED_PRECISIONS,
    OUTPUT_FORMATS,
    SAMPLE_UNITS,
    SITE_KINDS,
    TARGET_MODES,
)
from optimum_rmtkd.tasks import task_names

BIN = Path(sys.executable).parent
VERBS = ("compress", "analyze", "export", "benchmark", "push")
HEAVY = ("torch", "transformers")
# What the `--help` of a command may not load either (the STYLE's light-import rule, plus scipy for the option sets).
ALSO_LIGHT = ("scipy", "onnxruntime", "matplotlib", "pynvml")


def _loaded_after(code: str, modules=HEAVY + ALSO_LIGHT) -> list:
    """Run `code` in a fresh interpreter, then return which of `modules` it imported."""
    script = textwrap.dedent(code) + f"\nprint(sorted(m for m in {tuple(modules)!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", "import sys\n" + script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def test_register_module_is_light():
    assert _loaded_after("import optimum.commands.register.register_rmtkd") == []


def test_import_optimum_rmtkd_is_light():
    code = """
        import optimum_rmtkd
        from optimum_rmtkd.configuration import ESTIMATORS, SITE_KINDS
        from optimum_rmtkd.tasks import task_names

        optimum_rmtkd.RMTKDConfig(estimator="mppca", sites=("ffn",))
        assert task_names()
    """
    assert _loaded_after(code) == []


@pytest.mark.parametrize("verb", [None, *VERBS])
def test_help_of_every_command_is_light(verb):
    argv = [verb, "--help"] if verb else ["--help"]
    code = f"""
        from optimum_rmtkd.commands.rmtkd_cli import main

        try:
            main({argv!r})
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        else:
            raise AssertionError("--help did not exit")
    """
    assert _loaded_after(code) == []


@pytest.mark.parametrize("argv", [["rmtkd", "--help"], ["rmtkd", "compress", "--help"]])
def test_optimum_cli_help_is_light(argv):
    # optimum-cli's own entry point, which discovers every register module.
    code = f"""
        from optimum.commands.optimum_cli import main

        sys.argv = ["optimum-cli", *{argv!r}]
        try:
            main()
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        else:
            raise AssertionError("--help did not exit")
    """
    assert _loaded_after(code) == []


@pytest.mark.parametrize("command", [["rmtkd", "--version"], ["optimum-cli", "rmtkd", "--version"]])
def test_version(command):
    proc = subprocess.run([str(BIN / command[0]), *command[1:]], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"optimum-rmtkd {__version__}\n"


def test_choices_are_the_library_option_sets():
    # One definition: the parsers offer the very tuples `RMTKDConfig` checks against, and the registered tasks.
    expected = {"estimator": ESTIMATORS, "sample_unit": SAMPLE_UNITS, "sites": SITE_KINDS,
                "head_reduction": HEAD_REDUCTIONS, "output_format": OUTPUT_FORMATS,
                "on_metric_drop": METRIC_DROP_ACTIONS, "mixed_precision": MIXED_PRECISIONS,
                "channel_selection": CHANNEL_SELECTIONS, "hidden_cut": HIDDEN_CUTS, "target_mode": TARGET_MODES}
    assert {flag.field: flag.choices for flag in CONFIG_FLAGS if flag.choices is not None} == expected
    from optimum.commands.base import RootOptimumCLICommand

    root = RootOptimumCLICommand("rmtkd")
    for info in RMTKDCommand.SUBCOMMANDS:
        root.register_subcommand(info)
    for command in root.registered_subcommands:
        for action in command.parser._actions:
            if action.dest == "task":
                assert list(action.choices) == task_names(), command.COMMAND.name


@pytest.mark.slow
@pytest.mark.parametrize("transformers_first", [True, False])
def test_per_layer_types_are_registered(transformers_first):
    # `import optimum_rmtkd` registers the rmtkd_<base> types when transformers is already loaded; otherwise
    # `import optimum_rmtkd.modeling` does (the compressor, saving and the exporter import it).
    first, then = ("import transformers", "import optimum_rmtkd") if transformers_first else (
        "import optimum_rmtkd", "import transformers")
    code = f"""
        {first}
        {then}
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        registered = "rmtkd_bert" in CONFIG_MAPPING
        assert registered == {transformers_first}, registered
        import optimum_rmtkd.modeling

        assert "rmtkd_bert" in CONFIG_MAPPING and "rmtkd_resnet" in CONFIG_MAPPING
    """
    assert _loaded_after(code, ("transformers",)) == ["transformers"]
