"""The wheel as a user gets it: what it holds, and a push to the loopback Hub from a non-editable install of it.

The development environment is an editable install, which reads everything from the working tree, so a file left
out of the wheel (the model card template was) never shows up in the other tests. Here the wheel is built from a
copy of the sources, installed into a fresh virtual environment and run from there.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from _models import save_tiny_bert
from hub_server import TEST_TOKEN, TEST_USER, LocalHub
from test_hub import _report, _write_output


ROOT = Path(__file__).resolve().parent.parent
# What setuptools reads to build the wheel (README.md is the long description).
SOURCES = ["optimum_rmtkd", "optimum", "setup.cfg", "pyproject.toml", "README.md"]
TEMPLATE = "optimum_rmtkd/model_cards/rmtkd_model_card_template.md"
REGISTER = "optimum/commands/register/register_rmtkd.py"
REPO_ID = f"{TEST_USER}/tiny-bert-from-wheel"


def _source_files(root: Path) -> set[str]:
    return {
        path.relative_to(root).as_posix()
        for top in ("optimum_rmtkd", "optimum")
        for path in (root / top).rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """Build the wheel with the project's own pip and setuptools, offline; returns (source copy, wheel).

    From a copy, not in place: an in-tree build leaves `build/` behind, and its stale `build/lib` would put files
    deleted since the last build into the next wheel.
    """
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "--quiet",
               "--wheel-dir", str(folder / "dist"), str(source)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (folder / "dist").glob("optimum_rmtkd-*.whl")
    return source, wheel


def test_wheel_holds_every_package_file_and_no_optimum_init(built):
    source, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert archive.read(TEMPLATE) == (source / TEMPLATE).read_bytes()
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert TEMPLATE in names and REGISTER in names
    # optimum/ is a PEP 420 namespace shared with optimum itself: an __init__.py there would shadow it.
    assert not [name for name in names if name.startswith("optimum/") and name.endswith("__init__.py")]
    # Every file of the package sources is shipped (a new data file needs an `[options.package_data]` entry), and
    # nothing else: no tests, benchmarks or stray top-level modules.
    package_files = {name for name in names if ".dist-info/" not in name}
    assert package_files == _source_files(source)
    assert "rmtkd = optimum_rmtkd.commands.rmtkd_cli:main" in entry_points


@pytest.fixture(scope="module")
def wheel_venv(built, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed non-editable; the project's environment provides the
    dependencies through a `.pth` line (a plain path: the `.pth` files of that directory, among them the editable
    install's finder, are not run, so the working tree is never importable from here)."""
    _, wheel = built
    venv = tmp_path_factory.mktemp("venv") / "wheel-venv"
    # Without its own pip (ensurepip takes ~4 s): the project's pip installs into it with `--python`.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    (Path(purelib) / "project_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_"))}
    env.pop("PYTHONPATH", None)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", PYTHONNOUSERSITE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow  # ~20 s on 2 cores, mostly the cold import of torch and transformers by `rmtkd push`
def test_wheel_install_pushes_a_saved_model_to_the_loopback_hub(wheel_venv, tmp_path):
    work = tmp_path / "work"  # the subprocesses run here, so the working tree is not on sys.path through ''
    work.mkdir()
    check = textwrap.dedent(
        f"""
        import importlib.util, sys
        from pathlib import Path
        import optimum_rmtkd, optimum_rmtkd.hub
        from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands
        venv = Path(sys.prefix).resolve()
        assert Path(optimum_rmtkd.__file__).resolve().is_relative_to(venv), optimum_rmtkd.__file__
        assert optimum_rmtkd.hub.DEFAULT_TEMPLATE_PATH.is_file(), optimum_rmtkd.hub.DEFAULT_TEMPLATE_PATH
        assert optimum_rmtkd.hub.DEFAULT_TEMPLATE_PATH.resolve().is_relative_to(venv)
        register = importlib.util.find_spec("optimum.commands.register.register_rmtkd").origin
        assert Path(register).resolve().is_relative_to(venv), register
        assert [command.__name__ for command, _ in load_optimum_namespace_cli_commands()] == ["RMTKDCommand"]
        assert not [p for p in sys.path if Path(p or ".").resolve() == Path({str(ROOT)!r})], sys.path
        """
    )
    proc = subprocess.run([str(wheel_venv / "bin" / "python"), "-c", check], capture_output=True, text=True,
                          timeout=120, cwd=work, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr

    folder = save_tiny_bert(tmp_path / "tiny-bert-rmtkd")
    _write_output(folder, _report())
    with LocalHub() as hub:
        proc = subprocess.run(
            [str(wheel_venv / "bin" / "rmtkd"), "push", str(folder), "--hub-model-id", REPO_ID, "--token", TEST_TOKEN,
             "--endpoint", hub.url, "--quiet"],
            capture_output=True, text=True, timeout=300, cwd=work, env=_env(tmp_path),
        )
        assert proc.returncode == 0, proc.stderr
        assert f"Pushed {folder} to {hub.url}/{REPO_ID}/commit/" in proc.stdout
        assert hub.unknown_routes == []
        files = hub.files(REPO_ID)
    local = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert files == local
    card = files["README.md"].decode()  # written by the push from the wheel's template
    assert f'from_pretrained("{REPO_ID}")' in card and "@misc{ettori2025rmtkd," in card
