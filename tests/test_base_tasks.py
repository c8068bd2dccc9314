"""The unified base's tasks are correct by construction (issue 13).

* every edit op draws the scene it asks for (the judge passes the target render), keeps every object it does
  not name in exactly its boxes and color, and says what it does;
* near misses fail the judge and true pairs pass it; verdict records are balanced and their words are the
  judge's;
* records are valid format-v2 chats whose loss sits on the model's turns only, and held-out skills scenes
  never appear in training records;
* an edit record is laid out like the official editing plan (no prompt segment).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bagel_ft.trajectory import Trajectory
from demo.base_tasks import EDIT_MIX, TASKS, make_records, verdict_text
from scene_graphs.describe import describe
from scene_graphs.schema import SceneGraph
from scene_graphs.shapes import check, generate_prompts, parse_prompt
from scene_graphs.shapes.edits import EDIT_OPS, KEEP_TEXT, sample_edit
from scene_graphs.shapes.render import draw_layout
from scene_graphs.shapes.tasks import (
    CONSISTENT,
    DESCRIBE,
    INCONSISTENT,
    VERIFY,
    drawn_scene,
    heldout_texts,
    near_miss,
    parse_verdict_answer,
    true_pair,
)

VERBS = {"keep": KEEP_TEXT, "add": "add ", "remove": "remove ", "recolor": "make ", "resize": "make ", "move": "move ",
         "swap": "swap "}  # fmt: skip


def scenes(n: int, seed: int = 3, canvas: int = 64):
    for i, p in enumerate(generate_prompts(n, seed)):
        yield drawn_scene(p, canvas, seed=i)


@pytest.mark.parametrize("op", EDIT_OPS)
def test_every_edit_draws_what_it_asks_and_keeps_the_rest(op):
    rng = random.Random(0)
    made = 0
    for graph, layout in scenes(60):
        edit = sample_edit(graph, layout, op, rng)
        if edit is None:
            continue
        made += 1
        before, after = draw_layout(edit.before, edit.before_layout), draw_layout(edit.after, edit.after_layout)
        assert check(before, edit.before).consistent
        assert check(after, edit.after).consistent, (op, edit.instruction, check(after, edit.after).reasons)
        assert edit.instruction.startswith(VERBS[op])
        for oid in edit.unchanged:  # what the instruction does not name stays exactly where it was
            assert edit.after_layout.boxes[oid] == edit.before_layout.boxes[oid]
            assert edit.after_layout.colors[oid] == edit.before_layout.colors[oid]
        if op == "keep":
            assert edit.after == edit.before and after.tobytes() == before.tobytes()
        else:
            assert after.tobytes() != before.tobytes()
        if op in ("add", "move"):  # the new object is at the relation the instruction names
            assert any(r.subject in edit.changed or r.object in edit.changed for r in edit.after.relations) or (
                op == "add" and " of " not in edit.instruction and " above " not in edit.instruction
                and " below " not in edit.instruction
            )  # fmt: skip
    assert made >= 10, f"only {made} {op} edits in 60 scenes"


def test_resize_keeps_sprites_on_the_grid():
    from scene_graphs.shapes.vocab import GRID

    rng, step, margin = random.Random(1), 64 // GRID, 2
    for graph, layout in scenes(40):
        edit = sample_edit(graph, layout, "resize", rng)
        if edit is not None:
            for box in edit.after_layout.boxes[edit.changed[0]]:
                assert (box[0] - margin) % step == 0 and (box[1] - margin) % step == 0


def test_near_misses_fail_the_judge_and_true_pairs_pass():
    rng = random.Random(2)
    kinds = Counter()
    for graph, layout in scenes(80):
        assert true_pair(graph, layout).consistent
        pair = near_miss(graph, layout, rng)
        if pair is not None:
            kinds[pair.mistake] += 1
            assert not pair.consistent and not check(pair.image, pair.text_graph).consistent
            said = verdict_text(pair.image, pair.text_graph, pair.image_graph)
            assert said.startswith(f"the picture shows {describe(pair.image_graph)}; {INCONSISTENT}: ")
            assert parse_verdict_answer(said) == INCONSISTENT and check(pair.image, pair.image_graph).consistent
    assert set(kinds) == {"add", "remove", "recolor", "resize", "move", "swap"}, kinds


def test_records_are_valid_chats_with_loss_on_the_models_turns():
    for task in TASKS:
        records = make_records(task, 24, 64, seed=5)
        assert len(records) == 24
        for r in records:
            r.validate()
            assert Trajectory.from_row(r.to_row()).id == r.id
            for t in r.turns:
                if (
                    t.role == "text"
                    and t.text in (DESCRIBE, VERIFY)
                    or t.role == "text"
                    and r.subset in ("edit", "chat")
                ):
                    assert not t.loss  # a user's question or instruction
        if task == "edit":
            assert all([t.loss for t in r.turns] == [False, False, True] for r in records)
        if task == "verdict":
            labels = Counter(r.label for r in records)
            assert labels[CONSISTENT] == labels[INCONSISTENT] == 12
            for r in records:
                said = r.turns[-1].text
                assert said.startswith("the picture shows ") and parse_verdict_answer(said) == r.label
                if r.label == CONSISTENT:
                    assert said == f"the picture shows {r.prompt}; {CONSISTENT}"
                assert r.prompt == describe(SceneGraph.from_json(r.meta["text_graph"]))
        if task == "caption":
            for r in records:
                assert parse_prompt(r.turns[-1].text).isomorphic(parse_prompt(r.turns[-1].text))
                assert all("color" in o.attributes for o in parse_prompt(r.turns[-1].text).objects)


def test_edit_mix_holds_and_heldout_scenes_stay_out():
    records = make_records("edit", 300, 64, seed=9, exclude=heldout_texts())
    ops = Counter(r.meta["op"] for r in records)
    for op, share in EDIT_MIX.items():
        assert abs(ops[op] / 300 - share) < 0.07, (op, ops)
    held = heldout_texts()
    assert all(describe(SceneGraph.from_json(r.meta["before"])) not in held for r in records)


def test_edit_record_is_laid_out_like_official_editing():
    from bagel_ft.tokenizer import ByteTokenizer, SpecialTokens
    from bagel_ft.transforms import ImageGeometry
    from training.sequence import TEXT, VAE, VIT, PlanGeometry, build_sample_plan

    record = make_records("edit", 1, 32, seed=1)[0]
    tok = ByteTokenizer()
    plan = build_sample_plan(record, tok.encode, SpecialTokens.of(tok),
                             PlanGeometry(ImageGeometry(32, 32, 32, 32, 32 * 32), 8, 8))  # fmt: skip
    assert [(i.type, i.loss) for i in plan.items] == [(VAE, False), (VIT, False), (TEXT, False), (VAE, True)]
