"""`bagel-ft generate` end to end on the tiny reference checkpoint (CPU, seconds)."""

from __future__ import annotations

import json

import pytest

from commands.main import build_parser, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread, ~10x faster for tiny models


def test_help_has_examples():
    sub = build_parser("generate")._subparsers._group_actions[0].choices["generate"]
    text = sub.format_help()
    assert "bagel-ft generate --ckpt" in text and "--cfg-renorm-type" in text


def test_generate_single_and_psir_from_a_prompt_file(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\ntwo blue squares\n')
    common = ["--ckpt", str(tiny_dir), "--out", str(tmp_path / "out"), "--timesteps", "3", "--resolution", "16x24"]
    assert main(["generate", *common, "--prompts", str(prompts), "--seed", "7"]) == 0  # single by default
    # psir on a model not trained for it: the stream draws nothing, and the command says so (exit 2)
    assert (
        main(
            [
                "generate",
                *common,
                "--prompt",
                "a cat",
                "--mode",
                "psir",
                "--max-turn-tokens",
                "4",
                "--vit-min-size",
                "28",
                "--vit-max-size",
                "56",
            ]
        )
        == 2
    )
    assert "no image drawn in psir mode" in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [x["prompt"] for x in lines] == ["a red circle", "two blue squares", "a cat"]
    assert [x["stop_reason"] for x in lines] == ["single", "single", "format_failure"]
    for x in lines:
        folder = tmp_path / "out" / x["folder"]
        assert (folder / "index.html").is_file() and (folder / "final.png").is_file() == x["has_image"]
    assert [x["has_image"] for x in lines] == [True, True, False]  # the untrained model breaks the format
    row = json.loads((tmp_path / "out" / lines[0]["folder"] / "trajectory.json").read_text())
    assert json.loads(row["meta"])["seed"] == 7 and row["subset"] == "t2i"
    pages = [(tmp_path / "out" / x["folder"] / "index.html").read_text() for x in (lines[0], lines[2])]
    assert "<h1>Single-pass image" in pages[0] and "PSIR" not in pages[0].split("</h1>")[0]
    assert "<h1>PSIR trajectory" in pages[1]
    from PIL import Image

    assert Image.open(tmp_path / "out" / lines[0]["folder"] / "00.png").size == (24, 16)


def test_bad_resolution_fails_early(tiny_dir, tmp_path, capsys):
    code = main(["generate", "--ckpt", str(tiny_dir), "--out", str(tmp_path), "--prompt", "x", "--resolution", "15x16"])
    assert code == 2 and "multiple of latent_downsample" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # failed before drawing anything


def test_default_resolution_is_the_largest_the_model_draws():
    """FlowSettings() (0 x 0) draws as large as the model's latent table allows, capped at 1024 px: any
    caller that does not set a size (eval's config, data_gen) gets an image the model can draw."""
    from bagel_ft import BagelConfig
    from inference.engine import Engine
    from inference.settings import FlowSettings

    for preset, side in (("tiny", 32), ("bagel-7b-mot", 1024)):
        engine = Engine.__new__(Engine)
        engine.config = BagelConfig.preset(preset)
        assert engine.image_size(FlowSettings()) == (side, side)
        assert engine.image_size(FlowSettings(height=16, width=24)) == (16, 24)


def test_generate_in_batches_and_shards_draws_every_prompt_once(tiny_dir, tmp_path):
    """--batch-size and two --shard launches into one --out: every prompt once, with its own seed (seed + i)
    and the image a lone single-prompt run draws (within one 8-bit level)."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green star\n")
    common = [
        "--ckpt",
        str(tiny_dir),
        "--prompts",
        str(prompts),
        "--timesteps",
        "3",
        "--resolution",
        "16x16",
        "--mode",
        "single",
        "--seed",
        "5",
    ]
    assert main(["generate", *common, "--out", str(tmp_path / "one"), "--batch-size", "1"]) == 0
    for shard in ("1/2", "0/2"):
        assert (
            main(["generate", *common, "--out", str(tmp_path / "shards"), "--batch-size", "2", "--shard", shard]) == 0
        )

    def rows(run):
        lines = [json.loads(line) for line in (tmp_path / run / "results.jsonl").read_text().splitlines()]
        return {x["index"]: x for x in lines}

    one, shards = rows("one"), rows("shards")
    assert sorted(shards) == sorted(one) == [0, 1, 2]
    for i, x in one.items():
        assert shards[i]["prompt"] == x["prompt"]
        seeds = [
            json.loads(json.loads((tmp_path / run / r[i]["folder"] / "trajectory.json").read_text())["meta"])["seed"]
            for run, r in (("one", one), ("shards", shards))
        ]
        assert seeds == [5 + i, 5 + i]
        a, b = (
            np.asarray(Image.open(tmp_path / run / r[i]["folder"] / "final.png"), dtype=int)
            for run, r in (("one", one), ("shards", shards))
        )
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("prompt", ["", "   "])
def test_an_empty_prompt_is_refused_before_the_model_loads(prompt, tmp_path, capsys):
    assert (
        main(["generate", "--ckpt", str(tmp_path / "not-loaded"), "--out", str(tmp_path / "o"), "--prompt", prompt])
        == 2
    )
    assert '--prompt: expected a description of the picture, got ""' in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n\n")
    assert main(["generate", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o"), "--prompts", str(empty)]) == 2
    assert "no prompts" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_flags_and_set_over_the_checkpoint_inference_yaml(tmp_path):
    """The options of a run: inference's defaults < CKPT/inference.yaml < --set options.* < flags."""
    from commands.generate import options_from_args
    from commands.main import build_parser
    from inference.settings import save_checkpoint_options

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_checkpoint_options(ckpt, {"flow": {"num_timesteps": 26, "timestep_shift": 1.0, "cfg_text_scale": 1.0}})

    def options(*flags):
        args = build_parser("generate").parse_args(
            ["generate", "--ckpt", str(ckpt), "--out", "o", "--prompt", "x", *flags]
        )
        return options_from_args(args, max_side=64)

    base = options()
    assert (base.mode, base.flow.num_timesteps, base.flow.timestep_shift, base.flow.cfg_text_scale) == (
        "single",
        26,
        1.0,
        1.0,
    )
    assert base.flow.cfg_interval == (0.4, 1.0) and (base.flow.height, base.flow.width) == (
        64,
        64,
    )  # the rest: defaults
    over = options(
        "--set",
        "options.flow.num_timesteps=11",
        "--set",
        "options.text.top_p=0.5",
        "--cfg-text-scale",
        "2",
        "--cfg-interval",
        "0",
        "1",
        "--no-rollback",
        "--mode",
        "psir",
        "--resolution",
        "32x48",
    )
    assert (over.mode, over.flow.num_timesteps, over.flow.cfg_text_scale, over.text.top_p) == ("psir", 11, 2.0, 0.5)
    assert (
        over.flow.cfg_interval == (0.0, 1.0)
        and not over.scaling.rollback
        and (over.flow.height, over.flow.width) == (32, 48)
    )
    assert options("--set", "options.flow.num_timesteps=11", "--timesteps", "5").flow.num_timesteps == 5  # flags last
