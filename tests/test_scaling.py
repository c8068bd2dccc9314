"""Inference-time scaling (P streams x I iterations x k candidates) and the verifiers, on the tiny model.

The untrained model's steps are forced to `plan + draw` (see test_psir.py); the images, forks, CFG and
the search logic are real. The VLM critic runs the real openai client against a local fake server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fake_openai_server import FakeOpenAIServer

from bagel_ft.trajectory import plan_text
from inference.api import GenerateOptions, Generator
from inference.psir import DRAW, ForcedTurn, start_stream
from inference.scaling import search
from inference.settings import CriticEndpoint, FlowSettings, PSIRSettings, ScalingSettings, TextSettings
from inference.verifiers import (
    Critique,
    SelfInspectVerifier,
    ShapesJudge,
    VLMCritic,
    parse_critique,
)

FLOW = FlowSettings(height=32, width=32, num_timesteps=3, cfg_text_scale=2.0, cfg_interval=(0.0, 1.0))
SETTINGS = PSIRSettings(text=TextSettings(max_tokens=16), flow=FLOW)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: 1 thread, ~10x faster for tiny models


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def plan_and_draw(stream):
    return [ForcedTurn(plan_text(f"step {len(stream.images)}", "the scene"), decision=DRAW)]


class Brightness:
    """A stand-in verifier: the mean pixel value (distinct for every random image)."""

    name = "brightness"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, image, stream=None):
        self.calls += 1
        return Critique(score=float(np.asarray(image.convert("L"), dtype=np.float64).mean()))


class Scripted:
    """Scores (and actions / sub_prompts) in call order."""

    name = "scripted"

    def __init__(self, critiques):
        self.critiques = list(critiques)

    def __call__(self, prompt, image, stream=None):
        return self.critiques.pop(0)


def test_search_returns_the_verifiers_best_image(engine):
    verifier = Brightness()
    scaling = ScalingSettings(streams=2, iterations=2, candidates=2)
    found = search(engine, "a red circle", verifier, SETTINGS, scaling, seed=0, script=plan_and_draw)
    assert len(found.candidates) == verifier.calls == 8
    best = max(c.score for c in found.candidates)
    assert found.best.score == best and found.image is found.best.state.last_image
    assert Brightness()("", found.image).score == best  # re-judging the returned image gives the max
    assert found.cost.images == 8 and found.cost.flow_steps == 16
    # candidates of one step share their prefix's KV storage
    a, b = found.candidates[0].state.gen.cache, found.candidates[1].state.gen.cache
    assert a.shared_nbytes(b) > 0
    # every stream's chosen path grows: iteration-1 candidates hold 2 images
    assert [len(c.state.images) for c in found.candidates] == [1, 1, 2, 2, 1, 1, 2, 2]


def test_search_with_the_shapes_judge(engine):
    from scene_graphs import shapes

    prompt = "a red circle"
    found = search(
        engine,
        prompt,
        ShapesJudge(),
        SETTINGS,
        ScalingSettings(streams=2, iterations=2, candidates=1),
        seed=1,
        script=plan_and_draw,
    )
    graph = shapes.parse_prompt(prompt)
    scores = [shapes.check(c.state.last_image, graph).score for c in found.candidates]
    assert found.best.score == max(scores) == shapes.check(found.image, graph).score


def test_rollback_stop_and_sub_prompt(engine):
    critiques = [
        Critique(0.5),
        Critique(0.9, sub_prompt="make it red"),  # it 0: keep candidate 1; its advice is forced next
        Critique(0.2),
        Critique(0.3),  # it 1: both worse than 0.9 -> roll back to it 0's best
        Critique(0.95, action="STOP"),
        Critique(0.1),  # it 2: stop
    ]
    found = search(
        engine,
        "a circle",
        Scripted(critiques),
        SETTINGS,
        ScalingSettings(streams=1, iterations=5, candidates=2),
        seed=0,
        script=plan_and_draw,
    )
    assert [e.get("event") for e in found.events] == [None, "rollback", "stop"]
    refine = found.candidates[2].state.turns[2]
    assert refine.role == "refine" and refine.text == "<refine>make it red</refine>"
    assert [len(c.state.images) for c in found.candidates] == [1, 1, 2, 2, 2, 2]  # it 2 continues from it 0
    assert found.best.score == 0.95 and found.best.iteration == 2


def test_self_inspect_verifier_reads_the_models_verdict_without_touching_the_stream(engine):
    stream = start_stream(engine, "a red circle", seed=0)
    from inference.psir import advance

    assert advance(engine, stream, SETTINGS, plan_and_draw(stream))
    kv, rope = stream.gen.kv_len, stream.gen.rope
    critique = SelfInspectVerifier(engine)("a red circle", stream.last_image, stream)
    assert 0.0 < critique.score < 1.0 and (stream.gen.kv_len, stream.gen.rope) == (kv, rope)
    # the score is P(consistent) / (P(consistent) + P(inconsistent)) of teacher-forced decoding
    tok = engine.tokenizer
    logp = []
    for verdict in ("consistent", "inconsistent"):
        ids = tok.encode("<inspect>" + verdict)
        out = engine.decode_text(
            stream.gen.fork(), TextSettings(max_tokens=len(ids)), prefix=ids, keep_step_logits=True
        )
        rows = torch.log_softmax(out.step_logits, -1)
        n = len(tok.encode(verdict))
        logp.append(sum(rows[len(ids) - n + i, ids[len(ids) - n + i]] for i in range(n)))
    assert critique.score == pytest.approx(float(torch.sigmoid(logp[0] - logp[1])), abs=1e-5)


def test_vlm_critic_against_a_local_openai_compatible_server(monkeypatch):
    from PIL import Image

    seen = []

    def answer(body):
        seen.append(body)
        return (
            "Sure:\n```json\n"
            + json.dumps({"action": "continue", "score": 0.4, "sub_prompt": "add a blue square"})
            + "\n```"
        )

    monkeypatch.setenv("CRITIC_TEST_KEY", "sk-secret-value")
    with FakeOpenAIServer(answer, script={"Prompt: a red circle": ["500"]}) as server:
        critic = VLMCritic(
            CriticEndpoint(
                base_url=server.url,
                model="fake-vlm",
                api_key_env="CRITIC_TEST_KEY",
                max_attempts=3,
                backoff_base_s=0.01,
            )
        )
        critique = critic("a red circle", Image.new("RGB", (16, 16), (200, 0, 0)))
        assert server.faults() == {"500": 1, "ok": 1}  # the client retried the 500
    assert critique == Critique(score=0.4, action="CONTINUE", sub_prompt="add a blue square")
    content = seen[0]["messages"][1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "sk-secret" not in repr(critic)


def test_parse_critique_is_robust():
    assert parse_critique('{"action": "STOP", "score": 1}') == Critique(1.0, "STOP")
    bad = parse_critique("no json here")
    assert bad.score == 0.0 and bad.action == "CONTINUE" and "not a JSON object" in bad.reasons[0]
    odd = parse_critique('{"action": "DANCE", "score": "high"}')
    assert odd.action == "CONTINUE" and odd.score == 0.0 and len(odd.reasons) == 2


def test_generator_scaled_mode_records_the_search(engine, tmp_path):
    opts = GenerateOptions(
        mode="scaled",
        flow=FLOW,
        text=TextSettings(max_tokens=8),
        scaling=ScalingSettings(streams=1, iterations=1, candidates=2),
        verifier="shapes",
        fallback_image=True,
    )
    result = Generator(engine, opts).generate("a red circle", seed=0)
    # an untrained model breaks the format before drawing: nothing to choose, recorded as such
    assert result.search["best"] is None and len(result.search["candidates"]) == 2
    assert "fallback_image" in result.trajectory.meta and result.image is not None
    assert all(c["stop_reason"] == "format_failure" for c in result.search["candidates"])
    assert (result.save(tmp_path) / "trajectory.json").is_file()
