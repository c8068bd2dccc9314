"""The PSIR loop on the tiny (untrained) reference model.

An untrained model never writes PSIR tags, so well-formedness of a multi-step trajectory is tested with
forced decoding (`ForcedTurn`: the text and/or the draw decision of a turn are given; the images, the
CFG contexts and the cache bookkeeping are real). Free decoding is tested for what it must guarantee
on any model: it ends, within budget, with the failure recorded."""

from __future__ import annotations

import html
import json

import pytest
import torch

from bagel_ft.tokenizer import ByteTokenizer
from bagel_ft.trajectory import FORMAT_VERSION, Turn, inspect_text, plan_text, refine_text
from inference.api import GenerateOptions, Generator
from inference.engine import Engine
from inference.html import render_html
from inference.psir import DRAW, STOP, TEXT, ForcedTurn, classify, decide, describe_failure, run_psir
from inference.settings import Budget, FlowSettings, PSIRSettings, TextSettings

FLOW = FlowSettings(
    height=16, width=16, num_timesteps=3, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.0, 1.0)
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread, ~10x faster for tiny models


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def settings(**budget):
    return PSIRSettings(text=TextSettings(max_tokens=24), flow=FLOW, budget=Budget(**budget))


SCRIPT = [
    ForcedTurn(plan_text("draw a red circle", "a red circle"), decision=DRAW),
    ForcedTurn(inspect_text("inconsistent", "too small"), decision=TEXT),
    ForcedTurn(refine_text("make it bigger"), decision=DRAW),
    ForcedTurn(inspect_text("consistent"), decision=STOP),
]


def test_forced_multi_step_trajectory_is_well_formed(engine, tmp_path):
    stream = run_psir(engine, "a big red circle", settings(), seed=0, script=list(SCRIPT))
    traj = stream.to_trajectory({"seed": 0})
    traj.validate()
    assert [t.role for t in traj.turns] == ["plan", "image", "inspect", "refine", "image", "inspect"]
    assert stream.stop_reason == "end_of_text" and stream.failure is None
    assert len(traj.images) == 2 and traj.images[0].size == (16, 16)
    assert stream.cost.images == 2 and stream.cost.flow_steps == 4
    # the context holds exactly the stream: texts (bos + text + eos), images (clean VAE + ViT, one RoPE id each)
    tok = ByteTokenizer()
    text_lens = [len(tok.encode(t)) + 2 for t in ["a big red circle"] + [s.text for s in SCRIPT]]
    vae = engine.prepare_image(traj.images[0], "vae")  # resized like training (ImageGeometry)
    vit = engine.prepare_image(traj.images[0], "vit")
    vae_tokens = (vae.shape[1] // 4) * (vae.shape[2] // 4) + 2
    vit_tokens = (vit.shape[1] // 14) * (vit.shape[2] // 14) + 2
    assert stream.gen.kv_len == sum(text_lens) + 2 * (vae_tokens + vit_tokens)
    assert stream.gen.rope == sum(text_lens) + 2 * 2
    # the texts-only context (image CFG) holds the prompt and the text turns
    assert stream.cfg_img.kv_len == sum(text_lens)

    from inference.api import Result

    folder = Result("a big red circle", stream.last_image, traj, stream.cost).save(tmp_path)
    row = json.loads((folder / "trajectory.json").read_text())
    assert row["image_paths"] == ["00.png", "01.png"] and row["format_version"] == FORMAT_VERSION
    assert [s["role"] for s in row["meta"] and json.loads(row["meta"])["steps"]] == [
        "plan",
        "inspect",
        "refine",
        "inspect",
    ]
    assert all((folder / p).is_file() for p in row["image_paths"]) and (folder / "final.png").is_file()
    page = (folder / "index.html").read_text()
    assert '<img src="00.png"' in page and "make it bigger" in page
    assert "data:image/png;base64," in render_html(traj)  # self-contained variant


def test_same_seed_same_trajectory(engine):
    a = run_psir(
        engine,
        "a cat",
        settings(),
        seed=3,
        script=list(SCRIPT[:1]) + [ForcedTurn(inspect_text("consistent"), decision=STOP)],
    )
    b = run_psir(
        engine,
        "a cat",
        settings(),
        seed=3,
        script=list(SCRIPT[:1]) + [ForcedTurn(inspect_text("consistent"), decision=STOP)],
    )
    c = run_psir(
        engine,
        "a cat",
        settings(),
        seed=4,
        script=list(SCRIPT[:1]) + [ForcedTurn(inspect_text("consistent"), decision=STOP)],
    )
    assert a.images[0].tobytes() == b.images[0].tobytes() != c.images[0].tobytes()


def test_free_decoding_of_an_untrained_model_ends_with_a_recorded_failure(engine):
    stream = run_psir(engine, "a red circle", settings(), seed=0)
    assert stream.done and stream.stop_reason == "format_failure"
    assert stream.failure["step"] == 0 and stream.failure["reason"]
    assert stream.cost.tokens <= 24
    traj = stream.to_trajectory()
    assert traj.meta["failure"] == stream.failure and traj.turns == []


def test_constrained_prefix_is_completed_by_the_model(engine):
    stream = run_psir(engine, "a red circle", settings(max_tokens=30), seed=0, script=[ForcedTurn(prefix="<ins>")])
    step = stream.steps[0]
    assert step["text"].startswith("<ins>") and step["forced"]
    assert stream.stop_reason == "format_failure" and "unterminated" in stream.failure["reason"]


def test_format_failures_read_as_sentences(engine):
    """The reasons `text_turn` records, as the sentences reports and the trajectory page show."""
    _, unbalanced = classify("<ins>draw a red circle")
    assert describe_failure({"step": 2, "reason": unbalanced, "text": "<ins>draw a red circle"}) == (
        "The stream stopped at text turn 3: the turn opened <ins> once but closed it 0 times. "
        "It wrote: '<ins>draw a red circle'."
    )
    _, untagged = classify("a red circle")
    assert describe_failure({"step": 0, "reason": untagged, "text": "a red\ncircle"}) == (
        "The stream stopped at text turn 1: the turn had none of the PSIR tags (<ins>/<des> of a plan, <inspect>, "
        "<refine>). It wrote: 'a red circle'."
    )
    stream = run_psir(engine, "a red circle", settings(max_tokens=30), seed=0, script=[ForcedTurn(prefix="<ins>")])
    sentence = describe_failure(stream.failure)
    assert sentence.startswith("The stream stopped at text turn 1: the turn never ended (no <|im_end|> within ")
    assert "It wrote: '<ins>" in sentence
    page = render_html(stream.to_trajectory())
    assert html.escape(sentence) in page and 'class="card failure"' in page
    assert "&quot;reason&quot;" not in page.split("<details>")[0]  # no JSON dump of the failure


@pytest.mark.parametrize("budget,reason", [({"max_images": 1}, "max_images"), ({"max_steps": 2}, "max_steps")])
def test_budgets_end_the_stream(engine, budget, reason):
    script = [ForcedTurn(plan_text(f"step {i}", "x"), decision=DRAW) for i in range(4)]
    stream = run_psir(engine, "shapes", settings(**budget), seed=0, script=script)
    assert stream.stop_reason == reason
    assert len(stream.images) <= budget.get("max_images", 4) and len(stream.steps) <= budget.get("max_steps", 8)
    stream.to_trajectory().validate()


def test_decision_rule():
    tok = ByteTokenizer()
    eng = type("E", (), {"tokenizer": tok})()
    logits = torch.zeros(tok.vocab_size)
    logits[tok.bos_id] = 5.0
    logits[tok.end_of_text_id] = 1.0
    logits[tok.vision_start_id] = 2.0
    assert decide(eng, logits, "two_way") == DRAW  # <|im_start|> is not an option here
    assert decide(eng, logits, "three_way") == TEXT
    logits[tok.end_of_text_id] = 3.0
    assert decide(eng, logits, "two_way") == STOP


def test_classify_roles_and_problems():
    assert classify(plan_text("a", "b"))[0] == "plan"
    assert classify(inspect_text("inconsistent", "why"))[0] == "inspect"
    assert classify(refine_text("fix"))[0] == "refine"
    role, why = classify("just words")
    assert role is None and "no PSIR tags" in why
    role, why = classify("<ins>unbalanced")
    assert role is None and "unbalanced" in why


def test_generator_single_and_psir_modes(engine, tmp_path):
    gen = Generator(engine, GenerateOptions(flow=FLOW, text=TextSettings(max_tokens=8)))
    single = gen.generate("a red circle", mode="single", seed=1)
    assert single.image.size == (16, 16) and [t.role for t in single.trajectory.turns] == ["image"]
    assert single.trajectory.subset == "t2i" and single.cost.images == 1
    single.trajectory.validate()
    psir = gen.generate("a red circle", mode="psir", seed=1)
    assert psir.trajectory.meta["stop_reason"] == "format_failure" and psir.image is None
    assert (psir.save(tmp_path) / "index.html").is_file()
    gen.options.fallback_image = True  # ask for a final image regardless
    psir = gen.generate("a red circle", mode="psir", seed=1)
    assert "fallback_image" in psir.trajectory.meta and psir.image.size == (16, 16)
    assert psir.trajectory.images == [] and psir.cost.images == 1 and psir.cost.tokens == 8


def test_stream_logits_equal_the_training_forward_of_its_trajectory(engine):
    """What the engine saw while writing a trajectory is what training computes on that record: the
    next-token logits of every text turn position (incl. the draw/stop decision at <|im_end|>) match the
    packed training forward (noisy target + clean VAE + ViT per generated image, training.sequence)."""
    from bagel_ft.tokenizer import SpecialTokens
    from inference.psir import draw, start_stream
    from inference.settings import ImageGeometry
    from training.packing import PackingGeometry, pack_samples
    from training.sequence import PlanGeometry, build_sample_plan

    geometry = ImageGeometry(
        vae_max_size=32, vae_min_size=16, vit_max_size=56, vit_min_size=28
    )  # configs/train/tiny_cpu
    eng = Engine(engine.model, engine.tokenizer, geometry)
    tok = eng.tokenizer
    texts = [plan_text("draw a red circle", "a red circle"), inspect_text("inconsistent", "too small")]
    stream = start_stream(eng, "a red circle", seed=0)
    logits = []
    for i, text in enumerate(texts):
        out = eng.decode_text(
            stream.gen, TextSettings(max_tokens=999), prefix=tok.encode(text) + [tok.eos_id], keep_step_logits=True
        )
        stream.turns.append(Turn(role=["plan", "inspect"][i], text=text))
        logits.append(out.step_logits)
        if i == 0:
            draw(eng, stream, FlowSettings(height=16, width=24, num_timesteps=3, cfg_text_scale=1.0))
    traj = stream.to_trajectory()
    traj.validate()

    g = geometry  # the same bagel_ft.transforms.ImageGeometry drives inference and training
    plan = build_sample_plan(
        traj,
        tok.encode,
        SpecialTokens.of(tok),
        PlanGeometry(g, eng.config.latent_downsample, eng.config.vit.patch_size),
    )
    batch = pack_samples(
        [plan], SpecialTokens.of(tok), PackingGeometry.from_model_config(eng.config), torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        train_logits = eng.model(batch).ce_logits
    # CE rows: each turn's bos..last id, then its <|im_end|> (labelled vision_start before the generated
    # image, endoftext at the record's end) = exactly the rows the engine computed while decoding
    n_plan = logits[0].shape[0]
    assert batch.packed_label_ids[n_plan - 1].item() == tok.vision_start_id
    assert batch.packed_label_ids[-1].item() == tok.end_of_text_id
    assert train_logits.shape[0] == n_plan + logits[1].shape[0]
    assert (train_logits - torch.cat(logits)).abs().max().item() <= 1e-4


def test_edit_keeps_the_input_size_and_uses_the_three_cfg_contexts(engine):
    from PIL import Image

    gen = Generator(engine, GenerateOptions(flow=FLOW))
    source = Image.new("RGB", (24, 16), (200, 30, 30))
    edited = gen.edit(
        source, "make it blue", seed=0, flow=FlowSettings(num_timesteps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    )
    expected = engine.prepare_image(source, "vae").shape[1:]
    assert edited.size == (expected[1], expected[0])
    again = gen.edit(
        source, "make it blue", seed=0, flow=FlowSettings(num_timesteps=3, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0))
    )
    assert again.tobytes() == edited.tobytes()
