"""data_gen with our own model through `inference` (CPU, seconds): the model sampler of the critiques
pipeline and the bagel editor, on a tiny checkpoint written by the test.

An untrained model never writes PSIR tags, so its streams are counted `format_failure` rejections; a
well-formed stream is made with inference's forced decoding (`ForcedTurn`: the text turns are given,
the images and the cache bookkeeping are the model's own) and must become a valid labelled record."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch
from PIL import Image

from bagel_ft.trajectory import Trajectory, inspect_text, normalize_row, parse_verdict, plan_text
from commands.main import main
from common.call_cache import CallCache
from data_gen.backends import make_backends
from data_gen.backends import models as model_backends
from data_gen.config import load_config
from data_gen.shards import merge
from data_gen.summary import Summary
from scene_graphs import Step

SIZE = 32  # the tiny model draws at most 32 x 32 (max_latent_size 8 x latent_downsample 4)
FAST = ["model_sampler.timesteps=3", "model_sampler.max_turn_tokens=8", f"pipeline.image_size={SIZE}"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread, ~10x faster for tiny models


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A randomly initialised tiny checkpoint (model + autoencoder), as training would save one."""
    from bagel_ft.autoencoder import AutoEncoder
    from bagel_ft.config import BagelConfig
    from bagel_ft.modeling import Bagel

    torch.manual_seed(0)
    config = BagelConfig.preset("tiny")
    model = Bagel(config)  # __init__ runs the official init_weights
    path = tmp_path_factory.mktemp("tiny-ckpt")
    model.attach_vae(AutoEncoder(config.vae)).save_pretrained(path)
    return path


def data(*args: str, sets: tuple[str, ...] | list[str] = ()) -> int:
    """`bagel-ft data ARGS --set S ...` in this process."""
    return main(["data", *args, *[a for s in sets for a in ("--set", s)]])


def summary_of(out) -> dict:
    return json.loads(next(out.glob("summary-*.json")).read_text())


def test_untrained_model_samples_are_counted_format_failures(ckpt, tmp_path, capsys):
    out = tmp_path / "crit"
    sets = ["backends.sampler=model", f"model_sampler.ckpt={ckpt}", *FAST]
    # rejections are outcomes, not failures: the shard is complete (exit 0)
    assert data("critiques", "--out", str(out), "--num", "3", sets=sets) == 0
    total = summary_of(out)["total"]
    assert total["items"] == 3 and total["kept"] == 0 and not total["failed"]
    assert total["rejected"] == {"format_failure": 3}
    assert total["invalid"] == {"unterminated_turn": 3}  # no <|im_end|> within 8 tokens: the kind of failure
    text = capsys.readouterr().out
    assert "0 records kept from 3 prompts" in text and "rejected: format_failure=3" in text

    # the samples are cached, failures included: a re-run over new output samples nothing again
    again = out.parent / "again"
    assert data("critiques", "--out", str(again), "--num", "3", "--cache", str(out / "cache"), sets=sets) == 0
    assert summary_of(again)["cache"]["model.sample"] == {"hits": 3, "misses": 0}
    assert summary_of(again)["total"]["rejected"] == {"format_failure": 3}


PLANS = {  # prompt -> the plan text forced on the model (the second one strays from its prompt)
    "a red circle": ("draw a red circle", "a red circle"),
    "a blue square": ("draw a green triangle", "a green triangle"),
}


def test_a_well_formed_sampled_trajectory_becomes_a_labelled_critique(ckpt, tmp_path, monkeypatch):
    import inference.api
    from inference.batching import batchable
    from inference.psir import DRAW, STOP, ForcedTurn, run_psir

    @batchable  # a program, like run_psir: Generator.generate runs it (inference.batching)
    def forced_psir(engine, prompt, settings, seed):
        """Generator.generate's loop with the text turns forced: plan -> (the model draws) -> inspect."""
        script = [ForcedTurn(plan_text(*PLANS[prompt]), decision=DRAW),
                  ForcedTurn(inspect_text("consistent"), decision=STOP)]  # fmt: skip
        return (yield from run_psir.steps(engine, prompt, settings, seed, script=script))

    monkeypatch.setattr(inference.api, "run_psir", forced_psir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PLANS) + "\n")
    out = tmp_path / "crit"
    sets = ["backends.sampler=model", f"model_sampler.ckpt={ckpt}", *FAST]
    assert data("critiques", "--out", str(out), "--prompts", str(prompts), sets=sets) == 0
    total = summary_of(out)["total"]
    assert total["kept"] == 2 and not total["rejected"] and not total["failed"]

    records = {t.prompt: t for t in (Trajectory.from_row(normalize_row(r)) for r in merge([out]))}  # validates
    for prompt, t in records.items():
        assert t.subset == "critique" and t.label == "inconsistent"  # an untrained model's image is noise
        assert [turn.role for turn in t.turns] == ["plan", "image", "inspect", "refine", "image", "inspect"]
        assert [turn.loss for turn in t.turns[:2]] == [False, False]  # the model's own plan and draft: given
        assert t.turns[0].text == plan_text(*PLANS[prompt])
        assert parse_verdict(t.turns[2].text) == "inconsistent" and parse_verdict(t.turns[5].text) == "consistent"
        assert t.meta["judge"]["fix"]["fix"] in t.turns[3].text  # the judge's fix is the refine turn
        assert t.images[0].size == t.images[1].size == (SIZE, SIZE)
        assert t.meta["sampler_meta"]["source"] == "inference:psir"
        assert t.meta["sampler_meta"]["stop_reason"] == "end_of_text"
    red, blue = records["a red circle"], records["a blue square"]
    assert red.meta["judge"]["plan"]["consistent"] and not red.meta["judge"]["image"]["consistent"]
    assert not blue.meta["judge"]["plan"]["consistent"]  # the plan strays: corrected towards the prompt
    assert "green triangle" in blue.turns[2].text  # the analysis names what is wrong with the plan


def test_bagel_editor_renders_a_step_through_generator_edit(ckpt, tmp_path):
    from inference.psir import EDIT_FLOW

    step = Step("add", None, "draw a red circle", "a red circle")

    async def edit(size: int, cache: CallCache) -> tuple[Image.Image, Image.Image]:
        cfg = load_config(None, ["backends.editor=bagel", f"bagel_editor.ckpt={ckpt}", "bagel_editor.timesteps=3",
                                 f"pipeline.image_size={size}"])  # fmt: skip
        backends = make_backends(cfg, cache, Summary())
        assert backends.names()["editor"] == "bagel"
        canvas = await backends.editor.edit(None, step, seed=5)
        again = await backends.editor.edit(None, step, seed=5)
        return canvas.image, again.image

    cache = CallCache(tmp_path / "cache")
    image, again = asyncio.run(edit(SIZE, cache))
    assert image.size == (SIZE, SIZE) and image.tobytes() == again.tobytes()
    assert cache.stats()["bagel.edit"] == {"hits": 1, "misses": 1}  # the second edit came from the cache
    generator = model_backends.loaded_model(str(ckpt))  # the one loaded by the editor: loaded once per process
    assert len([k for k in model_backends._LOADED if k[0] == str(ckpt.resolve())]) == 1
    direct = generator.edit(Image.new("RGB", (SIZE, SIZE), model_backends.BLANK), step.instruction, seed=5,
                            flow=dataclasses.replace(EDIT_FLOW, num_timesteps=3))  # fmt: skip
    assert direct.tobytes() == image.tobytes()  # exactly Generator.edit of the blank canvas

    large, _ = asyncio.run(edit(2 * SIZE, cache))  # the tiny model draws 32 px; the canvas keeps its size
    assert large.size == (2 * SIZE, 2 * SIZE)


def test_trajectories_with_the_bagel_editor_run_from_the_cli(ckpt, tmp_path):
    out = tmp_path / "traj"
    sets = ["backends.editor=bagel", f"bagel_editor.ckpt={ckpt}", "bagel_editor.timesteps=3", f"pipeline.image_size={SIZE}",
            "pipeline.min_steps=1"]  # fmt: skip
    assert data("trajectories", "--out", str(out), "--num", "2", sets=sets) == 0
    total = summary_of(out)["total"]
    assert total["items"] == 2 and total["kept"] == 0 and not total["failed"]
    assert total["rejected"] == {"step_inconsistent": 2}  # an untrained editor draws noise: the judge says so


def test_checkpoint_backends_need_a_checkpoint(tmp_path):
    from data_gen.config import ConfigError
    from data_gen.errors import FatalError

    with pytest.raises(ConfigError, match="model_sampler.ckpt"):
        load_config(None, ["backends.sampler=model"])
    with pytest.raises(ConfigError, match="bagel_editor.ckpt"):
        load_config(None, ["backends.editor=bagel"])
    with pytest.raises(ConfigError, match="model_sampler.mode"):
        load_config(None, ["model_sampler.mode=single"])
    cfg = load_config(None, ["backends.sampler=model", f"model_sampler.ckpt={tmp_path / 'nope'}"])
    with pytest.raises(FatalError, match="not a directory"):
        make_backends(cfg, CallCache(tmp_path / "cache"), Summary(), with_sampler=True)


def test_a_stream_without_turns_is_a_counted_rejection(tmp_path):
    from data_gen.backends.models import ModelSampler
    from data_gen.errors import Rejected

    calls = []

    def sample(prompt: str, seed: int) -> Trajectory:  # a scaled search whose candidates all drew nothing
        calls.append(prompt)
        return Trajectory(prompt, [], meta={"stop_reason": "max_steps"})

    sampler = ModelSampler(CallCache(tmp_path), sample, model_id="empty")
    for _ in range(2):
        with pytest.raises(Rejected, match="before any turn") as e:
            asyncio.run(sampler.sample("a red circle", seed=1))
        assert e.value.reason == "empty_sample"
    assert calls == ["a red circle"]  # the outcome is cached like a trajectory
