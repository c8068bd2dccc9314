"""Property tests of trajectory subsampling (hypothesis): dependencies first, ends at the prompt graph,
bounded step count, deterministic."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scene_graphs import Relation, SceneGraph, SceneObject, describe, plan_steps
from scene_graphs.describe import explain_rewrite
from scene_graphs.subsample import DEFAULT_ATTRIBUTE_VALUES

NAMES = ("circle", "square", "triangle", "dog", "teddy bear")
COLORS = DEFAULT_ATTRIBUTE_VALUES["color"]


@st.composite
def graphs(draw) -> SceneGraph:
    n = draw(st.integers(1, 5))
    objects = []
    for i in range(n):
        attrs = {}
        if draw(st.booleans()):
            attrs["color"] = draw(st.sampled_from(COLORS))
        if draw(st.booleans()):
            attrs["size"] = draw(st.sampled_from(("small", "large")))
        objects.append(SceneObject(f"o{i}", draw(st.sampled_from(NAMES)), draw(st.integers(1, 4)), attrs))
    # relations consistent with random ranks along each axis, so the graph never contradicts itself
    xs, ys = draw(st.permutations(range(n))), draw(st.permutations(range(n)))
    relations = set()
    for _ in range(draw(st.integers(0, 4))):
        a, b = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
        if a == b:
            continue
        kind = draw(st.sampled_from(("x", "y", "on", "next to")))
        if kind == "x":
            relations.add(Relation(f"o{a}", "left of" if xs[a] < xs[b] else "right of", f"o{b}"))
        elif kind == "y":
            relations.add(Relation(f"o{a}", "above" if ys[a] < ys[b] else "below", f"o{b}"))
        else:
            relations.add(Relation(f"o{a}", kind, f"o{b}"))
    return SceneGraph(objects, sorted(relations))


def units(graph: SceneGraph) -> int:
    return sum(o.count for o in graph.objects)


@settings(max_examples=150, deadline=None)
@given(graphs(), st.integers(0, 10**6), st.integers(1, 4), st.integers(0, 3), st.sampled_from([0.0, 0.5, 1.0]))
def test_plan_properties(graph, seed, min_steps, extra, edit_prob):
    max_steps = min_steps + extra
    steps = plan_steps(graph, seed, min_steps=min_steps, max_steps=max_steps, edit_prob=edit_prob)
    assert steps[-1].graph == graph  # ends exactly at the prompt graph
    assert len(steps) <= max_steps
    assert len(steps) >= min(min_steps, units(graph))  # a graph with fewer units cannot be cut finer
    assert steps[0].op == "add" and steps[0].instruction.startswith("draw ")
    seen: set[str] = set()
    prev = SceneGraph()
    for step in steps:
        g = step.graph
        g.validate()
        for r in g.relations:  # nothing is related before both ends exist in that step
            assert r.subject in g and r.object in g
        for obj in g.objects:  # objects are either the prompt's or a distractor
            assert obj.id in graph or obj.id.startswith("distractor")
        assert step.description == describe(g)
        if step.op == "add":  # adds >= 1 object or instance, changes nothing that was there
            grew = [o for o in g.objects if o.id not in prev or o.count > prev.object(o.id).count]
            assert grew and set(prev.ids) <= set(g.ids)
            assert all(g.object(o.id).attributes == o.attributes for o in prev.objects)
        elif step.op == "modify":
            assert g.ids == prev.ids and g.relations == prev.relations and g != prev
        elif step.op == "swap":
            assert g.objects == prev.objects and g.relations != prev.relations
        elif step.op == "remove":
            assert set(g.ids) < set(prev.ids)
        seen |= set(g.ids)
        prev = g
    if edit_prob == 0.0:
        assert all(s.op == "add" for s in steps)
    pairs = [(s.op, s.graph) for s in steps]
    for k, step in enumerate(steps):  # every rewrite is explained by the earlier step that drew the fault
        if step.op != "add":
            why = explain_rewrite(pairs, k)
            teach = {"remove": "removing it", "swap": "swapping them back", "modify": "correcting it"}[step.op]
            assert f"so that step {k + 1} can teach {teach}" in why
            assert int(re.match(r"Step (\d+) draws ", why)[1]) <= k


@settings(max_examples=30, deadline=None)
@given(graphs(), st.integers(0, 10**6))
def test_plan_is_deterministic(graph, seed):
    a = plan_steps(graph, seed, edit_prob=0.5)
    b = plan_steps(graph, seed, edit_prob=0.5)
    assert [(s.op, s.graph.to_json(), s.instruction) for s in a] == [
        (s.op, s.graph.to_json(), s.instruction) for s in b
    ]


def test_every_rewrite_kind_occurs_and_is_undone():
    g = SceneGraph(
        [SceneObject("o0", "circle", 1, {"color": "red"}), SceneObject("o1", "square", 2, {"color": "blue"})],
        [Relation("o0", "left of", "o1")],
    )
    ops = set()
    for seed in range(40):
        steps = plan_steps(g, seed, min_steps=2, max_steps=5, edit_prob=0.7)
        ops |= {s.op for s in steps}
        assert steps[-1].graph == g
    assert ops == {"add", "modify", "swap", "remove"}


def test_rewrite_explanations_name_the_fault_and_the_step_that_drew_it():
    circle, square = SceneObject("o0", "circle", 1, {"color": "red"}), SceneObject("o1", "square", 1, {})
    blue_circle = SceneObject("o0", "circle", 1, {"color": "blue"})
    triangle = SceneObject("distractor0", "triangle", 1, {"color": "yellow"})
    right, reversed_ = Relation("o0", "left of", "o1"), Relation("o1", "left of", "o0")
    plan = [
        ("add", SceneGraph([square, triangle])),
        ("add", SceneGraph([blue_circle, square, triangle], [reversed_])),
        ("remove", SceneGraph([blue_circle, square], [reversed_])),
        ("swap", SceneGraph([blue_circle, square], [right])),
        ("modify", SceneGraph([circle, square], [right])),
    ]
    lesson = ": the model learns to correct a picture, not only to add to it."
    assert explain_rewrite(plan, 2) == (
        "Step 1 draws a distractor the prompt does not ask for (a yellow triangle) so that step 3 can teach "
        "removing it" + lesson
    )
    assert explain_rewrite(plan, 3) == (
        "Step 2 draws the square to the left of the blue circle, the reverse of what the prompt asks, so that "
        "step 4 can teach swapping them back" + lesson
    )
    assert explain_rewrite(plan, 4) == (
        "Step 2 draws a blue circle where the prompt asks for a red circle so that step 5 can teach correcting it"
        + lesson
    )
    with pytest.raises(ValueError, match="step 2 \\('add'\\) undoes nothing"):
        explain_rewrite(plan, 1)
