"""Every public module imports, and the command-line entry points answer."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import diffrig

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(diffrig.__path__, prefix="diffrig.")
    if not any(part.startswith("_") for part in m.name.split(".")[1:])
)


def test_public_modules_found():
    for expected in ("diffrig.cli", "diffrig.info", "diffrig.errors", "diffrig.deca", "diffrig.data"):
        assert expected in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_version_entry_point():
    out = subprocess.run([sys.executable, "-m", "diffrig", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"diffrig {diffrig.__version__}"


def test_info_lists_optional_pieces(tmp_path):
    env = {"DIFFRIG_DECA_DIR": str(tmp_path), "PATH": "", "HOME": str(tmp_path)}
    (tmp_path / "head_template.obj").write_text("v 0 0 0\n")
    out = subprocess.run([sys.executable, "-m", "diffrig"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"diffrig {diffrig.__version__}")
    assert "CUDA available:" in text
    assert "dlib 68-landmark model:" in text
    assert f"DECA data dir: {tmp_path.resolve()} (1/" in text
    assert "generic_model.pkl" in text.split("missing:")[1]
    assert "head_template.obj" not in text.split("missing:")[1]


def test_console_script_installed():
    import shutil

    exe = shutil.which("diffrig", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("package not installed with its console script (pip install -e .)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"diffrig {diffrig.__version__}"


def test_diffrig_demo_subcommand_dispatches_to_the_demo(capsys):
    from diffrig.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "synthetic world" in capsys.readouterr().out
