"""Every bad input of issue 17: exit status 2, a few lines naming the problem, no traceback, the folder usable.

Each test runs `bagel-ft` in-process (`commands.main.main`) and reads stderr; the exit rule itself is
`commands.main` (UserError, OSError, ValueError, `raise SystemExit("message")` -> one line, 2).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_checkpoint

from commands.main import main

REPO = Path(__file__).resolve().parents[1]


def one_clear_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert err.startswith("bagel-ft "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture(scope="module")
def corrupt_ckpt(tmp_path_factory):
    """A tiny checkpoint (configs, byte tokenizer, autoencoder) whose weights file was cut in half."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("corrupt") / "ckpt")
    weights = path / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompt", "a red circle", "--mode", "single"],
        ["eval", "shapes", "--limit", "1", "--n", "1", "--quiet"],
        ["demo", "--prompts", "4", "--quiet"],
    ],
    ids=["generate", "eval", "demo"],
)
def test_a_corrupt_checkpoint_is_one_line(corrupt_ckpt, command, tmp_path, capsys):
    flag = "--base" if command[0] == "demo" else "--ckpt"
    assert main([*command, flag, str(corrupt_ckpt), "--out", str(tmp_path / "out")]) == 2
    one_clear_line(capsys, f"bagel-ft {command[0]}: error:", "ema.safetensors", "truncated or corrupt")


def test_a_mismatched_checkpoint_is_named_before_any_work(tmp_path, capsys):
    """The demo checks its base before the data phase: a config that does not match the weights."""
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    llm = json.loads((ckpt / "llm_config.json").read_text())
    (ckpt / "llm_config.json").write_text(json.dumps({**llm, "num_hidden_layers": 3}))
    assert main(["demo", "--base", str(ckpt), "--out", str(tmp_path / "demo"), "--quiet"]) == 2
    one_clear_line(capsys, "does not match the model", "missing key language_model.model.layers.2")
    assert not (tmp_path / "demo" / "data").exists()


@pytest.mark.parametrize("num", ["0", "-5"])
def test_data_num_must_be_positive(num, tmp_path, capsys):
    assert main(["data", "trajectories", "--out", str(tmp_path / "d"), "--num", num]) == 2
    one_clear_line(capsys, f"--num: expected a count >= 1, got {num}")
    assert not (tmp_path / "d").exists()  # no empty dataset marked complete


@pytest.mark.parametrize("flag", ["--limit", "--n"])
def test_eval_counts_must_be_positive(flag, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["eval", "shapes", "--ckpt", "oracle:shapes", "--out", str(out), flag, "-1", "--quiet"]) == 2
    one_clear_line(capsys, f"{flag}: expected a count >= 1, got -1")
    assert not (out / "summary.json").exists()


def test_train_config_errors_exit_2_with_did_you_mean(capsys):
    assert main(["train", "configs/train/tiny_cpu.yaml", "--set", "train.lr=1e-3"]) == 2
    one_clear_line(capsys, "bagel-ft train: error: train.lr: unknown key; did you mean optim.lr?")
    assert main(["train", "configs/train/tiny_cpu.yaml", "--set", "optim.lr=fast"]) == 2
    one_clear_line(capsys, "optim.lr: expected a number, got 'fast'")


def test_one_override_syntax_for_every_command(tmp_path, capsys):
    """`--set KEY=VALUE` everywhere, with the same messages (common.config)."""
    assert (
        main(["data", "trajectories", "--out", str(tmp_path / "d"), "--num", "2", "--set", "pipeline.image_sise=64"])
        == 2
    )
    one_clear_line(capsys, "pipeline.image_sise: unknown key; did you mean pipeline.image_size?")
    shapes = ["eval", "shapes", "--ckpt", "oracle:shapes", "--out", str(tmp_path / "e"), "--quiet"]
    assert main([*shapes, "--set", "flow.num_timesteps=3"]) == 2  # inference keys live under options.
    one_clear_line(capsys, "expected a key under load. | options. | judge.")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "options.flow.num_timesteps=abc", "--quiet"]) == 2
    one_clear_line(capsys, "options.flow.num_timesteps: expected an integer, got 'abc'")


def test_every_data_pipeline_help_has_a_description_and_an_example(capsys):
    for name in ("trajectories", "critiques", "alignment"):
        with pytest.raises(SystemExit):
            main(["data", name, "--help"])
        out = capsys.readouterr().out
        assert f"build the {name} subset" in out and f"bagel-ft data {name}" in out.split("examples:")[1]


def test_train_help_first_example_works_on_a_fresh_clone(tmp_path, monkeypatch):
    """The first two lines of `bagel-ft train --help` build the data and train on it (1 step here)."""
    import commands.train

    examples = [line.split("#")[0].split() for line in commands.train.__doc__.splitlines() if line.startswith("  ")]
    data_cmd, train_cmd = examples[0], examples[1]
    assert data_cmd[:3] == ["python", "-m", "training.synthetic"] and train_cmd[:2] == ["bagel-ft", "train"]
    monkeypatch.chdir(tmp_path)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *data_cmd[1:]], check=True, env=env, capture_output=True)
    config = str(REPO / train_cmd[2])
    assert main(["train", config, "--set", "train.steps=1", "--set", "train.export_ema=false"]) == 0
    assert (tmp_path / "runs" / "tiny_cpu" / "checkpoints").is_dir()
