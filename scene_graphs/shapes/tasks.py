"""The shapes world's ground truth for a unified model's skills: drawn scenes, near misses, held-out scenes.

Shared by the base model's training data (`demo.base_tasks`) and its evaluation (`eval.skills`), so both
read a scene, phrase a question and judge a near miss the same way:

* `drawn_scene(prompt, canvas, seed)`: a prompt's scene as drawn, with every object's color made explicit
  (the renderer picks colors a prompt leaves open) and its layout.
* `near_miss(graph, layout, rng)`: a text / picture pair one visible mistake apart: the picture of one edit of
  the scene (`edits.sample_edit`: an object added or removed, a color, size or place changed, two objects
  swapped) beside the true text, or the true picture beside the edited scene's text. The label is the
  judge's (`judge.check`) on the exact render; a mistake the judge cannot see is not a near miss (None).
* `heldout_scenes(n, canvas)`: the skills evaluation's scenes (prompt seed `HELDOUT_SEED`); training data skip
  every scene whose description is among them (`heldout_texts`).
* `DESCRIBE` / `VERIFY`: the user's questions of the base's chats; `CONSISTENT` / `INCONSISTENT` the verdicts,
  answered as `verdict_answer` writes them (what the picture shows, then the verdict).
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from scene_graphs.describe import describe
from scene_graphs.schema import SceneGraph
from scene_graphs.shapes.edits import sample_edit
from scene_graphs.shapes.judge import check
from scene_graphs.shapes.layout import Layout, LayoutError
from scene_graphs.shapes.prompts import ShapesPrompt, generate_prompts
from scene_graphs.shapes.render import draw_layout, render

DESCRIBE = "describe the picture"
VERIFY = "does the picture match the text?"
CONSISTENT, INCONSISTENT = "consistent", "inconsistent"
MISTAKES = ("add", "remove", "recolor", "resize", "move", "swap")  # edits that make a near miss
HELDOUT_SEED = 777_001  # prompt seed of the held-out skills scenes (never a training scene)


def explicit_graph(graph: SceneGraph, colors: dict[str, str]) -> SceneGraph:
    """`graph` with the drawn color of every object (layout.colors) as an attribute."""
    objects = [dataclasses.replace(o, attributes={**o.attributes, "color": colors[o.id]}) for o in graph.objects]
    return SceneGraph(objects, graph.relations)


def drawn_scene(prompt: ShapesPrompt, canvas: int, seed: int) -> tuple[SceneGraph, Layout]:
    """The scene of `prompt` as drawn (render seed `seed`): its graph with explicit colors and its layout."""
    _, layout = render(prompt.graph, canvas, seed=seed)
    return explicit_graph(prompt.graph, layout.colors), layout


@dataclass
class Pair:
    """A text and a picture, and whether the judge finds them consistent."""

    text_graph: SceneGraph  # the scene the text describes (`describe(text_graph)`)
    image: Image.Image
    consistent: bool
    image_graph: SceneGraph | None = None  # the scene the picture shows (exact: it is a render)
    mistake: str = ""  # the edit that made a near miss ("" for a true pair)
    mode: str = ""  # "image": the picture is off; "text": the text is off


def true_pair(graph: SceneGraph, layout: Layout) -> Pair:
    image = draw_layout(graph, layout)
    return Pair(graph, image, check(image, graph).consistent, image_graph=graph)


def near_miss(graph: SceneGraph, layout: Layout, rng: random.Random, mistake: str | None = None,
              mode: str | None = None) -> Pair | None:  # fmt: skip
    """One mistake apart (module doc), or None when the scene offers no such mistake or the judge cannot see it."""
    mistake = mistake or rng.choice(MISTAKES)
    edit = sample_edit(graph, layout, mistake, rng)
    if edit is None:
        return None
    mode = mode or rng.choice(("image", "text"))
    if mode == "image":
        text_graph, image_graph, image = graph, edit.after, draw_layout(edit.after, edit.after_layout)
    else:
        text_graph, image_graph, image = edit.after, graph, draw_layout(graph, layout)
    if check(image, text_graph).consistent:
        return None
    return Pair(text_graph, image, False, image_graph, mistake, mode)


def verdict_answer(shown: SceneGraph, analysis: str | None) -> str:
    """The base's answer to VERIFY: what the picture shows, then the verdict (and, when inconsistent, why):
    "the picture shows a red circle; consistent" / "the picture shows ...; inconsistent: The circle is red, not
    blue." Describing first turns the comparison into one of two texts, which a small model learns far sooner
    than a bare yes / no (docs/results.md, "Unified base")."""
    head = f"the picture shows {describe(shown)}; "
    return head + (CONSISTENT if analysis is None else f"{INCONSISTENT}: {analysis}")


def parse_verdict_answer(text: str) -> str | None:
    """CONSISTENT / INCONSISTENT from a `verdict_answer`-style text (the first verdict word after a ';', or
    a bare verdict), else None."""
    m = re.search(rf"(?:^|;)\s*({INCONSISTENT}|{CONSISTENT})\b", text)
    return m.group(1) if m else None


def heldout_scenes(n: int, canvas: int) -> list[tuple[ShapesPrompt, SceneGraph, Layout]]:
    """The skills evaluation's scenes: prompts of seed HELDOUT_SEED, render seed = index (scenes that do not lay
    out on `canvas` are left out)."""
    out = []
    for i, p in enumerate(generate_prompts(n, HELDOUT_SEED)):
        try:
            graph, layout = drawn_scene(p, canvas, seed=i)
        except LayoutError:  # too crowded for a small canvas
            continue
        out.append((p, graph, layout))
    return out


@lru_cache(maxsize=4)
def heldout_texts(n: int = 400, canvas: int = 64) -> frozenset[str]:
    """Descriptions of the held-out scenes (explicit colors): a training scene with one of these is skipped."""
    return frozenset(describe(g) for _, g, _ in heldout_scenes(n, canvas))
