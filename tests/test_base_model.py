"""The shipped shapes base model (checkpoints/shapes-base) and the recipe's small pieces, without retraining.

* the checkpoint loads strictly with `Bagel.from_pretrained` (configs, ema.safetensors, ae.safetensors) and its
  tokenizer is the recipe's small BPE; it stays small;
* it generates an image of the canvas size through `inference` (few Euler steps: a plumbing check, not quality);
* its AE reconstructs a shapes render so the judge reads the same objects;
* the base data records are valid `t2i` / `caption` trajectories; the judge reads small images at native size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bagel_ft.checkpoint import AE_FILE, CONFIG_FILES
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import HFTokenizer, load_tokenizer

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-base"
OFFICIAL_FILES = (*CONFIG_FILES, "ema.safetensors", AE_FILE)


# Until the base model is trained and committed (issue 6), the tests of the shipped checkpoint wait for it;
# the recipe's pieces below are tested either way.
needs_checkpoint = pytest.mark.skipif(
    not (CKPT / "ema.safetensors").is_file(),
    reason="checkpoints/shapes-base not built yet: python -m demo.base_model --out checkpoints/shapes-base",
)


@pytest.fixture(scope="module")
def base_model() -> Bagel:
    torch.set_num_threads(1)
    return Bagel.from_pretrained(CKPT)


@needs_checkpoint
def test_checkpoint_files_are_the_official_layout_and_small():
    for name in OFFICIAL_FILES:
        assert (CKPT / name).is_file(), f"checkpoints/shapes-base/{name} missing"
    total = sum(f.stat().st_size for f in CKPT.iterdir() if f.is_file())
    assert total < 20 * 2**20, f"checkpoint is {total / 2**20:.1f} MiB; keep it a few MB"


@needs_checkpoint
def test_loads_strictly_with_its_autoencoder(base_model):
    assert base_model.vae is not None
    cfg = base_model.config
    tokenizer = load_tokenizer(CKPT)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size <= cfg.llm.vocab_size and cfg.llm.is_mot
    assert [len(tokenizer.encode(w)) for w in (" triangle", " purple", " left")] == [1, 1, 1]
    side = cfg.vae.resolution
    assert side == cfg.latent_downsample * cfg.arch.max_latent_size  # the canvas fills the latent table
    assert all(torch.isfinite(p).all() for p in base_model.parameters())


@needs_checkpoint
def test_generates_an_image_of_the_canvas_size(base_model):
    from inference.api import GenerateOptions, Generator
    from inference.engine import Engine, FlowSettings

    side = base_model.config.vae.resolution
    flow = FlowSettings(
        height=side, width=side, num_timesteps=4, timestep_shift=1.0, cfg_text_scale=2.0, cfg_interval=(0.0, 1.0)
    )
    gen = Generator(Engine(base_model, load_tokenizer(CKPT)), GenerateOptions(mode="single", flow=flow))
    result = gen.generate("a red circle to the left of a blue square", seed=0)
    assert result.image.size == (side, side)
    assert result.cost.flow_steps == 3


@needs_checkpoint
def test_autoencoder_reconstruction_reads_as_the_original(base_model):
    from demo.autoencoder import reconstruct
    from scene_graphs.shapes import check, generate_prompts, render

    side = base_model.config.vae.resolution
    prompts = generate_prompts(10, seed=123)
    originals = [render(p.graph, side, seed=i)[0] for i, p in enumerate(prompts)]
    recons = reconstruct(base_model.vae, originals)
    ok = [check(r, p.graph).consistent for p, r in zip(prompts, recons, strict=True)]
    assert sum(ok) >= 9, ok


def test_base_data_records_are_valid(tmp_path):
    from bagel_ft.trajectory import Trajectory
    from demo.base_data import caption_record, t2i_record, text_record
    from scene_graphs.shapes import generate_prompts, parse_prompt

    p = generate_prompts(5, seed=7)[4]  # color_attr: two colored objects
    t2i = t2i_record(p, 48, seed=3)
    cap = caption_record(p, 48, seed=3)
    text = text_record(p, 48, seed=3)
    for rec in (t2i, cap, text):
        rec.validate()
        assert Trajectory.from_row(rec.to_row()).id == rec.id
    assert [t.role for t in t2i.turns] == ["image"] and t2i.turns[0].loss
    assert [t.role for t in cap.turns] == ["image", "text", "caption"] and cap.prompt == ""
    assert [t.loss for t in cap.turns] == [False, False, True]  # the picture and the question are given
    caption_graph = parse_prompt(cap.turns[2].text)  # the caption is a shapes prompt naming every color
    assert all("color" in o.attributes for o in caption_graph.objects)
    assert cap.images[0].size == (48, 48)
    # text -> text: the prompt's own scene described, no image; a caption record with the prompt kept
    assert text.subset == "caption" and text.prompt == p.text and not text.images
    assert [t.role for t in text.turns] == ["caption"] and text.turns[0].loss
    assert parse_prompt(text.turns[0].text).to_json() == p.graph.to_json()
    assert len({t2i.id, cap.id, text.id}) == 3


def test_base_data_writes_one_folder_per_task(tmp_path):
    from demo.base_data import write_base_data
    from demo.base_model import train_overrides
    from training.data import RecordTable

    write_base_data(tmp_path / "data", {"t2i": 5, "caption": 3, "text": 4}, canvas=32, per_file=2)
    sizes = {task: len(RecordTable(tmp_path / "data" / task)) for task in ("t2i", "caption", "text")}
    assert sizes == {"t2i": 5, "caption": 3, "text": 4}
    sources = json.loads(train_overrides(tmp_path, None)[2].split("=", 1)[1])
    assert [(Path(s["path"]).name, s["weight"]) for s in sources] == [("t2i", 0.7), ("caption", 0.15), ("text", 0.15)]
    write_base_data(
        tmp_path / "notext" / "data", {"t2i": 2, "caption": 1, "text": 0}, canvas=32
    )  # no folder, no source
    sources = json.loads(train_overrides(tmp_path / "notext", None)[2].split("=", 1)[1])
    assert [Path(s["path"]).name for s in sources] == ["t2i", "caption"]


def test_base_tokenizer_reads_shapes_words_whole_and_fits_the_model(tmp_path):
    """The base's BPE, trained on the base data: shapes words are one id each, any text (PSIR tags included)
    round-trips, and the init checkpoint refuses a tokenizer larger than the model's vocabulary."""
    from bagel_ft.config import BagelConfig
    from demo.base_data import write_base_data
    from demo.base_model import MODEL_CONFIG, build_init_checkpoint, build_tokenizer

    write_base_data(tmp_path / "data", {"t2i": 60, "caption": 20, "text": 20}, canvas=32)
    cfg = BagelConfig.from_dir(MODEL_CONFIG)
    tok = build_tokenizer(tmp_path / "data", cfg.llm.vocab_size)
    assert tok.vocab_size <= cfg.llm.vocab_size
    for word in (" circle", " square", " triangle", " diamond", " cross", " red", " purple", " left"):
        assert len(tok.encode(word)) == 1, word
    text = "<ins>draw a red circle</ins><des>a red circle</des><inspect>inconsistent</inspect>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size
    tok.save_pretrained(tmp_path / "tok")
    cfg.llm.vocab_size = tok.vocab_size - 1
    with pytest.raises(ValueError, match="vocab_size"):
        build_init_checkpoint(cfg, tmp_path / "no-ae", tmp_path / "init", tokenizer_dir=tmp_path / "tok")


def test_score_images_judges_clean_renders_at_native_size():
    """One judging rule (eval.shapes_eval): clean 64 px renders pass at their own size, no upsampling."""
    from eval.shapes_eval import score_images
    from scene_graphs.shapes import render, shapes_eval_prompts

    prompts = shapes_eval_prompts()[::20]
    images = [render(p.graph, 64, seed=i)[0] for i, p in enumerate(prompts)]
    assert all(im.size == (64, 64) for im in images)
    summary = score_images(prompts, images)
    assert summary["overall"] == 1.0 and summary["total_images"] == len(prompts)
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        score_images(prompts[:2], images[:1])


def test_standardized_timestep_init_separates_late_timesteps():
    """BAGEL embeds t in [0, 1] unscaled: at the official init t = 0.9 and t = 1.0 embed almost alike; the
    standardised init (same module and shapes) spreads them apart, and keeps t -> embedding smooth."""
    from bagel_ft.config import BagelConfig
    from demo.base_model import MODEL_CONFIG, standardize_timestep_embedder

    torch.manual_seed(0)
    model = Bagel(BagelConfig.from_dir(MODEL_CONFIG))
    t = torch.tensor([0.9, 1.0])

    def relative_gap() -> float:
        e = model.time_embedder(t)
        return float((e[0] - e[1]).norm() / e[1].norm())

    shapes = {k: v.shape for k, v in model.time_embedder.state_dict().items()}
    before = relative_gap()
    standardize_timestep_embedder(model)
    after = relative_gap()
    assert {k: v.shape for k, v in model.time_embedder.state_dict().items()} == shapes
    assert before < 0.05 and after > 4 * before, (before, after)
    assert torch.isfinite(model.time_embedder(torch.linspace(0, 1, 11))).all()


@needs_checkpoint
def test_shipped_base_uses_the_timestep_and_the_prompt():
    """The failure the standardised timestep init fixed (docs/results.md, T1-T4): a base that cannot tell pure
    noise from a 10% signal does no better told the true t = 1 than told t = 0.5."""
    from demo.base_diagnostics import velocity_errors

    rows = {r.t: r for r in velocity_errors(str(CKPT), prompts=24, timesteps=(1.0, 0.9))}
    assert rows[1.0].true_t < 0.9 * rows[1.0].told_half, rows
    assert rows[1.0].true_t < 1.0, rows  # better than the unconditional-mean image (unit-variance latents)
    assert rows[0.9].conditioning_gain > 0, rows


@needs_checkpoint
def test_shipped_base_reads_the_shape_word():
    """The failure the grid fixed (docs/results.md, fourth session): a base that draws the average of the five
    shapes does as well told the wrong shape word as the right one (T12: +1.9% error; the shipped base: > +100%)."""
    from demo.base_diagnostics import word_sensitivity

    row = word_sensitivity(str(CKPT), timesteps=(0.9,))[0.9]
    assert row["shape swapped"] > 1.3 * row["true"], row
    assert row["color swapped"] > 1.3 * row["true"], row
