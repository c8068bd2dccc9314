"""The shapes base's tasks: BAGEL's pretraining mix in miniature, as records of the trajectory format.

Every task is a chat in the trajectory stream's markup (docs/format.md section 2, format version 2) without
the PSIR tags, which are the fine-tune's to teach. A user's turn is a `text` turn without loss (CFG-droppable
context); the model's answers are supervised text or generated images:

  t2i      prompt | image(loss)                                           draw from a prompt
  caption  image(given) | "describe the picture" | caption(loss)           understanding: the scene, explicit
  text     prompt | caption(loss)                                         the prompt's scene described
  edit     image(given) | instruction | image(loss)                       one edit (`scene_graphs.shapes.edits`)
  verdict  text | image(given) | "does the picture match the text?" | text(loss)
                                                                          "the picture shows <scene>;
                                                                          consistent", or "...; inconsistent:
                                                                          <what is missing, extra or wrong>"
  chat     prompt | image(loss) | 1-3 x (instruction | image(loss)  or  "describe the picture" | caption(loss))

Edits keep every object they do not name exactly where it was, in its color; `keep` edits (the copy
curriculum) ask for the picture unchanged. Verdict negatives are near misses: the picture of one edit of the
scene (a color, size, count, relation or object off) beside the true text, or the true picture beside the
text of such an edit; the label is the shapes judge's verdict on the exact render, and the analysis is its
words (`data_gen.backends.shapes.explain`), as in the PSIR critiques. Scenes come from `generate_prompts`
(all ten categories) rendered on the grid; scenes of the held-out skills set (`heldout_scenes`) never occur.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from bagel_ft.trajectory import Trajectory, Turn
from scene_graphs.describe import describe
from scene_graphs.schema import SceneGraph
from scene_graphs.shapes import ShapesPrompt, check, generate_prompts, render
from scene_graphs.shapes.edits import EDIT_OPS, Edit, sample_edit
from scene_graphs.shapes.layout import Layout, LayoutError
from scene_graphs.shapes.render import draw_layout
from scene_graphs.shapes.tasks import (
    CONSISTENT,
    DESCRIBE,
    INCONSISTENT,
    VERIFY,
    drawn_scene,
    explicit_graph,
    heldout_texts,
    near_miss,
    true_pair,
    verdict_answer,
)

SOURCE = "demo.base_data"
# edit ops in the base mixture, with their share of edit records; `keep` is the copy curriculum
EDIT_MIX = {"keep": 0.15, "add": 0.2, "remove": 0.15, "recolor": 0.15, "resize": 0.1, "move": 0.125, "swap": 0.125}


def verdict_text(image, text_graph: SceneGraph, shown: SceneGraph) -> str:
    """The answer to VERIFY for `image` (which shows `shown`) against `text_graph`: `verdict_answer` with the
    judge's verdict and its analysis (`data_gen.backends.shapes.explain`, the PSIR critiques' words)."""
    from data_gen.backends.shapes import explain

    judgement = explain(check(image, text_graph), text_graph)
    return verdict_answer(shown, None if judgement.consistent else judgement.analysis)


def pick_op(rng: random.Random, mix: dict[str, float] = EDIT_MIX) -> str:
    return rng.choices(list(mix), weights=list(mix.values()))[0]


# ---- records -------------------------------------------------------------------------------------------------
def _meta(task: str, seed: int, **extra) -> dict:
    return {"source": SOURCE, "task": task, "seed": seed, **extra}


def t2i_record(prompt: ShapesPrompt, canvas: int, seed: int) -> Trajectory:
    image, _ = render(prompt.graph, canvas, seed=seed)
    meta = _meta("t2i", seed, tag=prompt.tag, graph=prompt.graph.to_json(), canvas=canvas)
    return Trajectory(prompt.text, [Turn("image", image=0, loss=True)], [image], subset="t2i", meta=meta)


def caption_record(prompt: ShapesPrompt, canvas: int, seed: int) -> Trajectory:
    image, layout = render(prompt.graph, canvas, seed=seed)
    caption = describe(explicit_graph(prompt.graph, layout.colors))
    turns = [Turn("image", image=0, loss=False), Turn("text", DESCRIBE, loss=False), Turn("caption", caption)]
    meta = _meta("caption", seed, tag=prompt.tag, graph=prompt.graph.to_json(), canvas=canvas)
    return Trajectory("", turns, [image], subset="caption", meta=meta)


def text_record(prompt: ShapesPrompt, canvas: int, seed: int) -> Trajectory:
    """prompt | caption: the `describe` of the prompt's own scene graph, no image (`canvas` unused)."""
    meta = _meta("text", seed, tag=prompt.tag, graph=prompt.graph.to_json())
    return Trajectory(prompt.text, [Turn("caption", describe(prompt.graph))], [], subset="caption", meta=meta)


def edit_record(edit: Edit, seed: int) -> Trajectory:
    before = draw_layout(edit.before, edit.before_layout)
    after = draw_layout(edit.after, edit.after_layout)
    turns = [Turn("image", image=0, loss=False), Turn("text", edit.instruction, loss=False),
             Turn("image", image=1, loss=True)]  # fmt: skip
    meta = _meta("edit", seed, op=edit.op, before=edit.before.to_json(), after=edit.after.to_json(),
                 before_layout=edit.before_layout.to_json(), after_layout=edit.after_layout.to_json(),
                 unchanged=edit.unchanged, instruction=edit.instruction)  # fmt: skip
    return Trajectory("", turns, [before, after], subset="edit", meta=meta)


def verdict_record(
    graph: SceneGraph, layout: Layout, rng: random.Random, seed: int, positive: bool
) -> Trajectory | None:
    """A true pair or a near miss (`scene_graphs.shapes.tasks`); None when the tried mistake is not visible."""
    pair = true_pair(graph, layout) if positive else near_miss(graph, layout, rng)
    if pair is None or pair.consistent != positive:
        return None
    answer = verdict_text(pair.image, pair.text_graph, pair.image_graph)
    turns = [Turn("image", image=0, loss=False), Turn("text", VERIFY, loss=False), Turn("text", answer)]
    meta = _meta("verdict", seed, text_graph=pair.text_graph.to_json(), mistake=pair.mistake, mode=pair.mode)
    label = CONSISTENT if positive else INCONSISTENT
    return Trajectory(describe(pair.text_graph), turns, [pair.image], subset="verdict", label=label, meta=meta)


def chat_record(prompt: ShapesPrompt, canvas: int, rng: random.Random, seed: int) -> Trajectory | None:
    """prompt | image(loss), then 1-3 turns over the evolving picture: an edit (instruction | image) or a
    description of the current picture."""
    graph, layout = drawn_scene(prompt, canvas, seed)
    images = [draw_layout(graph, layout)]
    turns = [Turn("image", image=0, loss=True)]
    ops = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.3:
            turns += [Turn("text", DESCRIBE, loss=False), Turn("caption", describe(graph))]
            ops.append("describe")
            continue
        op = pick_op(rng, {k: v for k, v in EDIT_MIX.items() if k != "keep"})
        edit = sample_edit(graph, layout, op, rng)
        if edit is None:
            continue
        graph, layout = edit.after, edit.after_layout
        images.append(draw_layout(graph, layout))
        turns += [Turn("text", edit.instruction, loss=False), Turn("image", image=len(images) - 1, loss=True)]
        ops.append(op)
    if not ops:
        return None
    meta = _meta("chat", seed, tag=prompt.tag, graph=prompt.graph.to_json(), ops=ops, final=graph.to_json())
    return Trajectory(prompt.text, turns, images, subset="chat", meta=meta)


# ---- task writers: n records of a task from prompts of a seed ------------------------------------------------
def make_records(task: str, n: int, canvas: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Trajectory]:
    """`n` records of `task` (one of TASKS), deterministic given `seed`; scenes whose description is in
    `exclude` (the held-out skills scenes) are skipped."""
    rng = random.Random(seed)
    _pending.clear()
    prompts = [p for p in generate_prompts(max(n, 500), seed) if p.text not in exclude]
    out: list[Trajectory] = []
    i = 0
    while len(out) < n:
        record = _MAKERS[task](prompts[i % len(prompts)], canvas, rng, i, exclude)
        i += 1
        if record is not None:
            out.append(record)
    return out


def _simple(fn: Callable) -> Callable:
    return lambda p, canvas, rng, i, exclude: fn(p, canvas, i)


def _fresh_scene(p, canvas, i, exclude) -> tuple[SceneGraph, Layout] | None:
    """The drawn scene of prompt `p` (render seed `i`), None when it does not lay out or is held out."""
    try:
        graph, layout = drawn_scene(p, canvas, i)
    except LayoutError:
        return None
    return None if describe(graph) in exclude else (graph, layout)


def _edit(p, canvas, rng, i, exclude):
    if (scene := _fresh_scene(p, canvas, i, exclude)) is None:
        return None
    graph, layout = scene
    op = _pending.pop("op", None) or pick_op(rng)
    edit = sample_edit(graph, layout, op, rng)
    if edit is None:  # the scene offers no such edit: the next scene gets the same op, so the mix holds
        _pending["op"] = op
        return None
    return edit_record(edit, i)


_pending: dict[str, str] = {}  # the op an `_edit` call could not make, carried to the next scene


def _verdict(p, canvas, rng, i, exclude):
    """Positives at even indexes, negatives at odd ones (several mistakes tried), so labels stay balanced."""
    if (scene := _fresh_scene(p, canvas, i, exclude)) is None:
        return None
    graph, layout = scene
    for _ in range(1 if i % 2 == 0 else 8):
        record = verdict_record(graph, layout, rng, i, positive=i % 2 == 0)
        if record is not None:
            return record
    return None


def _chat(p, canvas, rng, i, exclude):
    try:
        record = chat_record(p, canvas, rng, i)
    except LayoutError:
        return None
    if record is None or describe(SceneGraph.from_json(record.meta["final"])) in exclude:
        return None
    return record


_MAKERS = {"t2i": _simple(t2i_record), "caption": _simple(caption_record), "text": _simple(text_record),
           "edit": _edit, "verdict": _verdict, "chat": _chat}  # fmt: skip
TASKS = tuple(_MAKERS)
__all__ = ["EDIT_OPS", "TASKS", "explicit_graph", "heldout_texts", "make_records", "verdict_text"]
