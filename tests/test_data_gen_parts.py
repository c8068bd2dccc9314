"""data_gen parts on hand-sized inputs: configs, cache keys, shards, schema checks, mistakes, verdict texts,
model adapters."""

from __future__ import annotations

import asyncio
import base64
import random
from pathlib import Path

import pytest
from PIL import Image

from common.call_cache import CallCache, request_key
from common.images import image_to_png
from data_gen.backends.base import Canvas
from data_gen.backends.models import BagelEditor, KontextEditor
from data_gen.backends.remote import parse_scene_graph, schema_errors
from data_gen.backends.shapes import explain, plan_problems
from data_gen.config import ConfigError, KontextConfig, load_config
from data_gen.errors import FatalError, InvalidReply
from data_gen.perturb import KINDS, perturb
from data_gen.shards import parse_shard, select_items
from scene_graphs import SCENE_GRAPH_JSON_SCHEMA, Step
from scene_graphs.shapes import check, parse_prompt, render

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.pipeline.min_steps <= cfg.pipeline.max_steps


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="pipeline.nope"):
        load_config(None, ["pipeline.nope=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(None, ["pipeline.max_steps=four"])
    with pytest.raises(ConfigError, match="endpoint.base_url"):
        load_config(None, ["backends.judge=vlm"])  # a VLM judge needs an endpoint
    assert load_config(None, ["endpoint.timeout_s=3"]).endpoint.timeout_s == 3.0


def test_cache_keys_count_images_by_content_and_values_are_atomic(tmp_path):
    png = image_to_png(Image.new("RGB", (8, 8), (255, 0, 0)))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    other = image_to_png(Image.new("RGB", (8, 8), (0, 0, 255)))
    assert request_key({"messages": [url]}) == request_key({"messages": [png]})
    assert request_key({"messages": [url]}) != request_key({"messages": [other]})
    assert request_key({"a": 1, "b": 2}) == request_key({"b": 2, "a": 1})
    cache = CallCache(tmp_path)
    key, value = cache.lookup("x", {"q": 1})
    assert value is None
    cache.put(key, {"text": "hi"})
    assert cache.lookup("x", {"q": 1}) == (key, {"text": "hi"})
    assert cache.stats() == {"x": {"hits": 1, "misses": 1}}
    assert not list(tmp_path.rglob("*.tmp"))


def test_shards_partition_the_prompts():
    prompts = [f"prompt {i}" for i in range(50)] + ["prompt 3"]  # a repeated prompt counts once
    parts = [select_items(prompts, 40, (i, 4), 1) for i in range(4)]
    texts = [it.prompt for part in parts for it in part]
    assert sorted(texts) == sorted(f"prompt {i}" for i in range(40))
    assert select_items(prompts, 40, (2, 4), 1) == parts[2]  # stable
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_scene_graph_replies_are_classified():
    good = {
        "objects": [{"id": "o0", "name": "circle", "count": 2, "color": "red", "size": None, "material": None}],
        "relations": [],
    }
    assert schema_errors(good, SCENE_GRAPH_JSON_SCHEMA) == []
    assert len(parse_scene_graph(good)) == 1
    with pytest.raises(InvalidReply) as e:
        parse_scene_graph({"objects": [{"id": "o0", "name": "circle", "count": "many"}], "relations": []})
    assert e.value.reason == "schema_violation"
    with pytest.raises(InvalidReply) as e:
        parse_scene_graph({**good, "relations": [{"subject": "o0", "predicate": "left of", "object": "o7"}]})
    assert e.value.reason == "invalid_scene_graph"


def test_every_mistake_is_a_different_drawable_graph():
    graph = parse_prompt("two red circles to the left of a blue square")
    for kind in KINDS:
        mistaken = perturb(graph, kind, random.Random(0))
        assert mistaken is not None and mistaken != graph
        render(mistaken, 128, 0)
    assert perturb(parse_prompt("a circle"), "missing", random.Random(0)) is None


@pytest.mark.parametrize("kind, analysis, fix", [
    ("color", "Two circles are purple, not red.", "make the purple circles red"),
    ("relation", "The red circles are not to the left of the blue square.", "move the red circles to the left of the blue square"),
    ("count", "There is only one red circle, not two.", "add another red circle"),
    ("missing", "Two red circles are missing.", "add two red circles to the left of the blue square"),
])  # fmt: skip
def test_verdicts_are_explained_with_a_fix(kind, analysis, fix):
    graph = parse_prompt("two red circles to the left of a blue square")
    image, _ = render(perturb(graph, kind, random.Random(1)), 128, 0)
    verdict = explain(check(image, graph), graph)
    assert (verdict.consistent, verdict.analysis, verdict.fix) == (False, analysis, fix)


def test_plan_problems():
    prompt = parse_prompt("two red circles to the left of a blue square")
    assert plan_problems(parse_prompt("a red circle"), prompt, final=False) == []
    assert plan_problems(parse_prompt("a green circle"), prompt, final=False)
    assert plan_problems(parse_prompt("a red circle"), prompt, final=True)  # not yet the whole prompt
    assert plan_problems(parse_prompt("a blue square to the left of two red circles"), prompt, final=True)


def test_model_adapters(tmp_path):
    cache = CallCache(tmp_path)
    with pytest.raises(FatalError, match="generate_fn"):
        BagelEditor(cache, 32, None)
    calls = []

    def generate(prev: Image.Image, instruction: str, seed: int) -> Image.Image:
        calls.append(instruction)
        return Image.new("RGB", prev.size, (len(instruction), 0, 0))

    editor = BagelEditor(cache, 32, generate, model_id="ckpt-a")
    step = Step("add", None, "draw a red circle", "a red circle")
    first = asyncio.run(editor.edit(None, step, seed=0))
    again = asyncio.run(editor.edit(None, step, seed=0))
    assert calls == ["draw a red circle"] and first.image.tobytes() == again.image.tobytes()  # second one cached
    asyncio.run(editor.edit(Canvas(first.image), step, seed=0))
    assert len(calls) == 2  # another previous image is another call
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(FatalError, match=r"pip install -e '\.\[kontext\]'"):
            KontextEditor(cache, 32, KontextConfig())
