"""The console script: every subcommand has --help, and dispatch imports only the module it runs."""

import subprocess
import sys

import pytest

from commands.main import SUBCOMMANDS


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command):
    out = subprocess.run([sys.executable, "-m", "commands.main", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"bagel-ft {command}" in out.stdout and "--" in out.stdout


def test_top_level_help_lists_all_and_imports_no_subcommand_module():
    code = (
        "import sys; from commands.main import main, SUBCOMMANDS\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "mods = {m.split('.')[0] for m, _ in SUBCOMMANDS.values()} - {'commands'}\n"
        "print(sorted(m for m in mods if m in sys.modules), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert name in out.stdout
    assert out.stdout.strip().endswith("[] False")


def test_unknown_subcommand_is_an_error():
    out = subprocess.run([sys.executable, "-m", "commands.main", "paint"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "commands.main",
            "model",
            "--ckpt",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2, out.stderr
    assert "bagel-ft model: error:" in out.stderr and "nope" in out.stderr and "Traceback" not in out.stderr


def test_version():
    out = subprocess.run([sys.executable, "-m", "commands.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("bagel-ft 0."), out
