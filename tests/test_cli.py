"""The `sparsewsi` command line: dispatch, errors, config overrides."""

import subprocess
import sys

import pytest

from sparsewsi import cli


def test_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_a_clear_error(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_every_command_module_imports_and_builds_its_parser():
    import argparse
    import importlib

    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"sparsewsi {name}")
        module.add_arguments(parser)
        assert callable(module.run), name


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--config.optim.lr=3e-3"], ["--set", "optim.lr=3e-3"]),
        (["--config.total_steps", "5", "--workdir", "w"], ["--set", "total_steps=5", "--workdir", "w"]),
        (["--config", "configs/tiny.py"], ["--config", "configs/tiny.py"]),
    ],
)
def test_big_vision_style_overrides_become_set(argv, expected):
    assert cli.config_overrides_to_set(argv) == expected


def test_train_rejects_an_unknown_config_field(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sparsewsi.cli", "train", "--config", str(cli_root() / "configs" / "tiny.py"),
         "--workdir", str(tmp_path / "w"), "--config.no_such_field=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no field 'no_such_field'" in proc.stderr


def cli_root():
    import pathlib

    return pathlib.Path(__file__).resolve().parents[1]
