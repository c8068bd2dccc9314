"""Batched inference gives the results of sequential inference.

  * the scheduler (`inference.batching`) on a recording fake engine: ragged joins and leaves, batch limits,
    `gather`, results routed back to the right program;
  * the CFG branches of a flow step, packed in one forward, equal separate forwards (one per branch);
  * a tick mixing every op kind (text, flow, clean VAE and ViT images) equals each op alone;
  * many samples per forward: latents and images of a batch equal those of each sample alone, whatever the
    batch size or order (every sample draws its noise from its own seeded generator);
  * PSIR streams, forced (tiny reference model, all three CFG contexts) and free-running (tiny-psir, sampled
    text: the streams plan, draw and stop at different times) give the same trajectories batched and alone.
Floats agree within 1e-5 (fp32; packed matmuls reassociate sums); a decoded image within one 8-bit level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_ft.trajectory import inspect_text, plan_text, refine_text
from inference.api import Generator
from inference.batching import batchable, gather, run_alone, run_batched
from inference.engine import Engine, FlowTrace
from inference.psir import DRAW, STOP, TEXT, ForcedTurn, run_psir, start_stream
from inference.settings import Budget, FlowSettings, GenerateOptions, PSIRSettings, TextSettings
from inference.tick import CleanImage, Tokens, Velocity

TINY_PSIR = Path(__file__).parent / "assets" / "tiny-psir"
FLOW = FlowSettings(
    height=16,
    width=16,
    num_timesteps=4,
    cfg_text_scale=4.0,
    cfg_img_scale=2.0,
    cfg_interval=(0.0, 1.0),
    cfg_renorm_type="text_channel",
)
TOL = dict(atol=1e-5, rtol=0)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def pixels_close(a: Image.Image, b: Image.Image) -> bool:
    """Decoded images equal up to one 8-bit level (to_pil truncates: a 1e-6 latent difference can cross it)."""
    return a.size == b.size and int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()) <= 1


# ---- the scheduler -------------------------------------------------------------------------------------


class RecordingEngine:
    """execute(ops) answers op * 10 and records which ops shared each tick."""

    def __init__(self):
        self.ticks: list[list] = []

    def execute(self, ops):
        self.ticks.append(list(ops))
        return [op * 10 for op in ops]


def counter(name: str, start: int, steps: int):
    """A program of `steps` ticks, one op each (start, start + 1, ...); checks every answer."""
    for i in range(steps):
        answer = yield [start + i]
        assert answer == [(start + i) * 10], (name, answer)
    return name


def test_run_batched_is_ragged_and_routes_every_answer():
    fake = RecordingEngine()
    steps = [3, 1, 0, 2, 4]
    programs = [counter(f"p{i}", 100 * i, n) for i, n in enumerate(steps)]
    done = list(run_batched(fake, programs, batch_size=2))
    assert sorted(d.index for d in done) == [0, 1, 2, 3, 4]
    assert all(d.value == f"p{d.index}" for d in done) and all(d.wall_s >= 0 for d in done)
    assert [d.index for d in done] == [1, 2, 0, 3, 4]  # completion order
    assert all(len(t) <= 2 for t in fake.ticks)
    # p1 leaves after one tick: p2 (no ops) joins and ends at once, p3 joins the second tick beside p0
    assert fake.ticks[0] == [0, 100] and fake.ticks[1] == [1, 300] and fake.ticks[2] == [2, 301]
    assert sum(len(t) for t in fake.ticks) == sum(steps)  # every op executed exactly once
    with pytest.raises(ValueError, match="batch_size"):
        list(run_batched(fake, [], batch_size=0))


def test_gather_and_batchable_run_sub_programs_side_by_side():
    class Owner:
        def __init__(self):
            self.engine = RecordingEngine()

        @batchable
        def both(self, a: int, b: int):
            """Two counters in lockstep."""
            return (yield from gather(counter("a", a, 2), counter("b", b, 3)))

    owner = Owner()
    assert owner.both(0, 50) == ["a", "b"]  # run alone through owner.engine
    assert owner.engine.ticks == [[0, 50], [1, 51], [52]]
    assert Owner.both.__doc__ == "Two counters in lockstep." and owner.both.__name__ == "both"
    fake = RecordingEngine()
    assert run_alone(fake, owner.both.steps(7, 9)) == ["a", "b"] and fake.ticks[0] == [7, 9]


# ---- packed forwards vs separate forwards ---------------------------------------------------------------


def contexts(engine: Engine, prompt: str, text: str):
    """gen = prompt + image + text; cfg_text = gen before the text; cfg_img = the texts only."""
    gen = engine.new_context()
    engine.update_text(gen, prompt)
    engine.update_image(gen, Image.new("RGB", (16, 16), (200, 40, 40)))
    cfg_text = gen.fork()
    engine.update_text(gen, text)
    cfg_img = engine.new_context()
    engine.update_text(cfg_img, prompt)
    engine.update_text(cfg_img, text)
    return gen, cfg_text, cfg_img


def test_cfg_branches_in_one_forward_equal_one_forward_per_branch(engine):
    gen, cfg_text, cfg_img = contexts(engine, "a red circle", "make it bigger")
    trace = FlowTrace()
    engine.generate_latent(gen, cfg_text, cfg_img, FLOW, torch.Generator().manual_seed(0), trace=trace)
    h, w = engine.latent_grid(16, 16)
    assert [len(b) for b in trace.branches] == [3, 3, 3]  # cond, cfg_text, cfg_img in every step
    for t, x_t, branches in zip(trace.t, trace.x_t, trace.branches, strict=True):
        for ctx, packed in zip((gen, cfg_text, cfg_img), branches, strict=True):
            torch.testing.assert_close(packed, engine.velocity(ctx, x_t, t, h, w), **TOL)


def test_a_tick_of_every_op_kind_equals_each_op_alone(engine):
    def fresh():
        gen, cfg_text, cfg_img = contexts(engine, "two blue squares", "a plan")
        return gen, cfg_text, cfg_img

    image = engine.prepare_image(Image.new("RGB", (16, 16), (10, 200, 30)), "vae")
    vit = engine.prepare_image(Image.new("RGB", (16, 16), (10, 200, 30)), "vit")
    x = torch.randn(4, engine.config.patch_latent_dim, generator=torch.Generator().manual_seed(1))

    def ops(a, b, c, d):
        return [
            Tokens(a, [65, 66, 67], all_logits=True),
            Velocity(b, x, 0.7, 2, 2),
            CleanImage(c, image, "vae"),
            CleanImage(d, vit, "vit"),
        ]

    packed_ctx = [*fresh(), engine.new_context()]
    alone_ctx = [*fresh(), engine.new_context()]
    packed = engine.execute(ops(*packed_ctx))
    alone = [engine.execute([op])[0] for op in ops(*alone_ctx)]
    torch.testing.assert_close(packed[0], alone[0], **TOL)
    torch.testing.assert_close(packed[1], alone[1], **TOL)
    assert packed[2] is None and packed[3] is None
    for p, a in zip(packed_ctx, alone_ctx, strict=True):  # the caches hold the same thing afterwards
        assert (p.kv_len, p.rope) == (a.kv_len, a.rope)
        torch.testing.assert_close(engine.feed_tokens(p, [70]), engine.feed_tokens(a, [70]), **TOL)


def test_a_tick_may_not_append_to_a_context_another_op_reads(engine):
    ctx = engine.new_context()
    engine.update_text(ctx, "a prompt")
    x = torch.zeros(4, engine.config.patch_latent_dim)
    with pytest.raises(ValueError, match="same tick"):
        engine.execute([Tokens(ctx, [65]), Velocity(ctx, x, 0.5, 2, 2)])
    engine.execute([Velocity(ctx, x, 0.5, 2, 2), Velocity(ctx, x, 0.9, 2, 2)])  # peeking twice is fine


# ---- many samples per forward ---------------------------------------------------------------------------

PROMPTS = [
    "a red circle",
    "two green triangles left of a big blue square",
    "one small yellow star",
    "a cat",
    "three purple diamonds in a row above a circle",
]


def latent_program(engine: Engine, prompt: str, seed: int):
    """Prompt contexts as in single mode, then the flow from the seed's own noise."""
    stream = yield from start_stream.steps(engine, prompt, seed)
    return (
        yield from engine.generate_latent.steps(stream.gen, stream.cfg_text, stream.cfg_img, FLOW, stream.generator)
    )


def test_batched_latents_equal_each_sample_alone_in_any_batch(engine):
    jobs = [(p, 10 + i) for i, p in enumerate(PROMPTS)]
    alone = [run_alone(engine, latent_program(engine, p, s)) for p, s in jobs]
    for batch_size, order in ((3, [0, 1, 2, 3, 4]), (5, [4, 2, 0, 3, 1])):
        done = run_batched(engine, (latent_program(engine, *jobs[k]) for k in order), batch_size)
        for d in done:
            torch.testing.assert_close(d.value, alone[order[d.index]], **TOL)


def test_generate_many_single_mode_equals_generate(engine):
    gen = Generator(engine, GenerateOptions(mode="single", flow=FLOW))
    jobs = [(p, 3 * i) for i, p in enumerate(PROMPTS)]
    batched = dict(gen.generate_many(jobs, batch_size=4))
    assert sorted(batched) == list(range(len(jobs)))
    for i, (prompt, seed) in enumerate(jobs):
        one = gen.generate(prompt, seed=seed)
        assert pixels_close(batched[i].image, one.image)
        assert batched[i].trajectory.meta["seed"] == seed and batched[i].cost.images == one.cost.images == 1
        assert batched[i].cost.flow_steps == one.cost.flow_steps


# ---- PSIR streams -------------------------------------------------------------------------------------------

SCRIPTS = [
    [
        ForcedTurn(plan_text("draw a red circle", "a red circle"), decision=DRAW),
        ForcedTurn(inspect_text("inconsistent", "too small"), decision=TEXT),
        ForcedTurn(refine_text("make it bigger"), decision=DRAW),
        ForcedTurn(inspect_text("consistent"), decision=STOP),
    ],
    [
        ForcedTurn(plan_text("draw two squares", "two blue squares"), decision=DRAW),
        ForcedTurn(inspect_text("consistent"), decision=STOP),
    ],
    [ForcedTurn(prefix="<ins>", decision=DRAW)],  # the model completes it (and may break the format)
]


def assert_same_streams(batched, alone):
    assert [t.text for t in batched.turns] == [t.text for t in alone.turns]
    assert [t.role for t in batched.turns] == [t.role for t in alone.turns]
    assert (batched.stop_reason, batched.failure) == (alone.stop_reason, alone.failure)
    assert (batched.cost.images, batched.cost.tokens, batched.cost.flow_steps) == (
        alone.cost.images,
        alone.cost.tokens,
        alone.cost.flow_steps,
    )
    assert len(batched.images) == len(alone.images)
    assert all(pixels_close(a, b) for a, b in zip(batched.images, alone.images, strict=True))


def test_forced_psir_streams_batched_equal_alone(engine):
    settings = PSIRSettings(text=TextSettings(max_tokens=24), flow=FLOW, budget=Budget())
    jobs = [(f"prompt {i}: {PROMPTS[i]}", i, SCRIPTS[i]) for i in range(3)]
    alone = [run_psir(engine, p, settings, s, list(script)) for p, s, script in jobs]
    programs = (run_psir.steps(engine, p, settings, s, list(script)) for p, s, script in jobs)
    done = {d.index: d.value for d in run_batched(engine, programs, batch_size=3)}
    assert [len(s.images) for s in alone] == [2, 1, len(alone[2].images)]
    for i in range(3):
        assert_same_streams(done[i], alone[i])


@pytest.mark.skipif(not TINY_PSIR.exists(), reason="tests/assets/tiny-psir not present")
def test_free_running_psir_streams_batched_equal_alone():
    """The trained stream model decodes freely (sampled): streams of different lengths share the forwards."""
    options = GenerateOptions(
        mode="psir",
        text=TextSettings(temperature=0.8, top_p=0.95),
        flow=FlowSettings(num_timesteps=5),
        budget=Budget(max_steps=8, max_images=3),
    )
    gen = Generator.from_pretrained(TINY_PSIR, options)
    jobs = [
        (p, 7 * i)
        for i, p in enumerate(
            [
                "two green diamonds to the right of a red triangle",
                "a blue circle",
                "three yellow squares",
                "a red star above a circle",
            ]
        )
    ]
    execute, ticks = gen.engine.execute, []

    def spy(ops):  # which op kinds shared each tick
        ticks.append({type(op) for op in ops})
        return execute(ops)

    gen.engine.execute = spy
    batched = dict(gen.generate_many(jobs, batch_size=3))
    del gen.engine.execute
    alone = [gen.generate(p, seed=s) for p, s in jobs]
    assert len({r.cost.tokens for r in alone}) == len(jobs)  # turns of different lengths: the streams drift apart
    assert sum(r.cost.images for r in alone) >= 3
    assert any({Tokens, Velocity} <= kinds for kinds in ticks)  # one stream decodes while another draws
    for i, one in enumerate(alone):
        b = batched[i]
        assert [t.text for t in b.trajectory.turns] == [t.text for t in one.trajectory.turns]
        assert b.trajectory.meta["stop_reason"] == one.trajectory.meta["stop_reason"]
        assert (b.cost.images, b.cost.tokens) == (one.cost.images, one.cost.tokens)
        assert all(pixels_close(x, y) for x, y in zip(b.trajectory.images, one.trajectory.images, strict=True))


def test_moe_routing_with_few_und_rows_equals_the_gather_scatter_path(tiny_model, monkeypatch):
    """apply_experts runs `gen` on every row when the und rows are few (a batched flow forward); the values
    must be those of sending each row to its own expert only (FEW_ROWS = 0 forces that path)."""
    from bagel_ft import qwen2

    layer = tiny_model.language_model.model.layers[0]
    x = torch.randn(40, tiny_model.config.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    routing = qwen2.Routing.for_mode("gen", 40, torch.tensor([i for i in range(40) if i % 20 not in (0, 19)]))
    modules = [
        (layer.mlp, layer.mlp_moe_gen),
        (layer.input_layernorm, layer.input_layernorm_moe_gen),
        (layer.self_attn.q_proj, layer.self_attn.q_proj_moe_gen),
    ]
    with torch.no_grad():
        few = [qwen2.apply_experts(u, g, x, routing) for u, g in modules]
        monkeypatch.setattr(qwen2, "FEW_ROWS", 0.0)
        split = [qwen2.apply_experts(u, g, x, routing) for u, g in modules]
    for a, b in zip(few, split, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    identity = torch.nn.Identity()
    assert qwen2.apply_experts(identity, identity, x, routing) is x  # no in-place write into the input
