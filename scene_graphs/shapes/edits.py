"""Image edits in the shapes world: a scene, one instruction, the edited scene, with exact layouts.

`sample_edit(graph, layout, op, rng)` turns a drawn scene (graph with explicit colors + its layout) into an
`Edit`: the scene after the instruction, laid out so that every object the instruction does not name keeps
its exact boxes and color (the shapes world renders both pictures exactly). These are the base model's
editing data (`demo.base_tasks`) and the held-out scenes of `bagel-ft eval skills`. Operations (`EDIT_OPS`):

  keep     "keep the picture as it is"                     nothing changes (the copy curriculum)
  add      "add a red circle to the left of the blue square"  a new object (or instance), placed on the grid
                                                           next to the others; with a relation to an object
                                                           already there when one fits
  remove   "remove the blue square"                        an object (or one of its instances) vanishes
  recolor  "make the red circle blue"                      same boxes, new color
  resize   "make the red circle large"                     the box resized about its center, snapped to the grid
  move     "move the red circle to the left of the blue square"  one object re-placed so the relation holds
  swap     "swap the red circle and the blue square"       two objects trade places

Instructions are `scene_graphs.describe.instruction`'s words (the PSIR trajectories' `<ins>` and the shapes
judge's fixes say the same things). Returns None when the scene offers no such edit (e.g. `swap` with fewer
than two single objects, or no room to add); callers try another scene or op.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np

from scene_graphs.describe import instruction, noun_phrase, predicate_phrase
from scene_graphs.schema import Relation, SceneGraph, SceneObject
from scene_graphs.shapes.layout import (
    LAYOUT_MARGIN,
    RELATION_THRESHOLD,
    Box,
    Layout,
    _moved,
    _place_one,
    _violations,
    relation_score,
    side_px,
)
from scene_graphs.shapes.vocab import COLORS, GRID, RELATIONS, SHAPES

EDIT_OPS = ("keep", "add", "remove", "recolor", "resize", "move", "swap")
KEEP_TEXT = "keep the picture as it is"


@dataclass
class Edit:
    op: str  # one of EDIT_OPS
    before: SceneGraph  # the scene shown (explicit colors)
    before_layout: Layout
    after: SceneGraph  # the scene asked for
    after_layout: Layout
    instruction: str
    changed: tuple[str, ...] = ()  # ids of objects whose pixels the edit changes (all others stay exactly)

    @property
    def unchanged(self) -> list[str]:
        """Ids of objects drawn identically before and after (what an edit must keep in place)."""
        return [o for o in self.before.ids if o in self.after and o not in self.changed]


def sample_edit(graph: SceneGraph, layout: Layout, op: str, rng: random.Random) -> Edit | None:
    """An `op` edit of the drawn scene (`graph` with every object's color explicit, `layout` its boxes)."""
    if op not in EDIT_OPS:
        raise ValueError(f"sample_edit: unknown op {op!r}; expected one of {EDIT_OPS}")
    return _OPS[op](graph, layout, rng)


def _keep(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit:
    return Edit("keep", graph, layout, graph, layout, KEEP_TEXT)


def _add(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit | None:
    size = layout.size
    singles = [o for o in graph.objects if o.count == 1]
    if rng.random() < 0.2 and graph.objects:  # another instance of an object already there
        obj = rng.choice(graph.objects)
        if obj.count >= 4:
            return None
        after = graph.with_count(obj.id, obj.count + 1)
        box = _place_one(after, obj.id, side_px(obj.attributes.get("size"), size), _boxes(layout), _target(rng, size),
                         size, rng)  # fmt: skip
        if box is None:
            return None
        boxes = {**_boxes(layout), obj.id: layout.boxes[obj.id] + [box]}
        after_layout = Layout(size, boxes, dict(layout.colors))
        return Edit("add", graph, layout, after, after_layout, instruction("add", graph, after), (obj.id,))
    new = _new_object(graph, rng)
    after = graph.with_object(new)
    if singles and rng.random() < 0.75:  # placed at a relation to an object already there
        anchor = rng.choice(singles)
        after = after.with_relation(Relation(new.id, rng.choice(RELATIONS), anchor.id))
    box = _place_one(after, new.id, side_px(new.attributes.get("size"), size), _boxes(layout), _target(rng, size),
                     size, rng)  # fmt: skip
    if box is None:
        return None
    after_layout = Layout(size, {**_boxes(layout), new.id: [box]}, {**layout.colors, new.id: new.attributes["color"]})
    return Edit("add", graph, layout, after, after_layout, instruction("add", graph, after), (new.id,))


def _remove(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit | None:
    """The reverse of an add: an object (or one instance) of the scene vanishes."""
    if len(graph) < 2 and graph.objects[0].count == 1:
        return None  # an empty canvas is no scene
    obj = rng.choice(graph.objects)
    boxes = _boxes(layout)
    if obj.count > 1 and rng.random() < 0.5:
        k = rng.randrange(obj.count)
        after = graph.with_count(obj.id, obj.count - 1)
        boxes[obj.id] = boxes[obj.id][:k] + boxes[obj.id][k + 1 :]
        if not _holds(after, boxes, size=layout.size):
            return None
        changed = (obj.id,)
    else:
        if len(graph) < 2:
            return None
        after = graph.without_object(obj.id)
        boxes.pop(obj.id)
        changed = ()
    colors = {k: v for k, v in layout.colors.items() if k in after}
    return Edit("remove", graph, layout, after, Layout(layout.size, boxes, colors), instruction("remove", graph, after),
                changed)  # fmt: skip


def _recolor(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit | None:
    obj = rng.choice(graph.objects)
    options = [c for c in COLORS if c != obj.attributes["color"] and _distinct(graph, obj, color=c)]
    if not options:
        return None
    color = rng.choice(options)
    after = graph.with_attributes(obj.id, color=color)
    after_layout = Layout(layout.size, _boxes(layout), {**layout.colors, obj.id: color})
    return Edit("recolor", graph, layout, after, after_layout, instruction("modify", graph, after), (obj.id,))


def _resize(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit | None:
    obj = rng.choice(graph.objects)
    now = obj.attributes.get("size")  # None = medium, which no instruction can name as a target
    options = [s for s in ("small", "large") if s != now and _distinct(graph, obj, size=s)]
    if not options:
        return None
    new_size = rng.choice(options)
    after = graph.with_attributes(obj.id, size=new_size)
    side = side_px(new_size, layout.size)
    boxes = _boxes(layout)
    boxes[obj.id] = [_resized(b, side, layout.size) for b in boxes[obj.id]]
    if not _holds(after, boxes, layout.size):
        return None
    after_layout = Layout(layout.size, boxes, dict(layout.colors))
    return Edit("resize", graph, layout, after, after_layout, instruction("modify", graph, after), (obj.id,))


def _move(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit | None:
    singles = [o for o in graph.objects if o.count == 1]
    if len(singles) < 2:
        return None
    obj, anchor = rng.sample(singles, 2)
    a, b = layout.boxes[obj.id][0], layout.boxes[anchor.id][0]
    predicates = [p for p in RELATIONS if relation_score(np.array(a), np.array(b), p) <= RELATION_THRESHOLD]
    if not predicates:
        return None
    rel = Relation(obj.id, rng.choice(predicates), anchor.id)
    after = SceneGraph(graph.objects, [r for r in graph.relations if obj.id not in (r.subject, r.object)] + [rel])
    others = {k: v for k, v in _boxes(layout).items() if k != obj.id}
    box = _place_one(after, obj.id, a[2] - a[0], others, _target(rng, layout.size), layout.size, rng)
    if box is None:
        return None
    after_layout = Layout(layout.size, {**others, obj.id: [box]}, dict(layout.colors))
    text = f"move {noun_phrase(obj, True)} {predicate_phrase(rel.predicate)} {noun_phrase(anchor, True)}"
    return Edit("move", graph, layout, after, after_layout, text, (obj.id,))


def _swap(graph: SceneGraph, layout: Layout, rng: random.Random) -> Edit | None:
    singles = [o for o in graph.objects if o.count == 1]
    if len(singles) < 2:
        return None
    x, y = rng.sample(singles, 2)
    if x.name == y.name and x.attributes == y.attributes:
        return None
    boxes = _boxes(layout)
    boxes[x.id], boxes[y.id] = _moved(boxes[x.id], boxes[y.id]), _moved(boxes[y.id], boxes[x.id])
    swap = {x.id: y.id, y.id: x.id}
    after = SceneGraph(graph.objects, [Relation(swap.get(r.subject, r.subject), r.predicate,
                                                swap.get(r.object, r.object)) for r in graph.relations])  # fmt: skip
    if not _holds(after, boxes, layout.size):
        return None
    text = f"swap {noun_phrase(x, True)} and {noun_phrase(y, True)}"
    return Edit("swap", graph, layout, after, Layout(layout.size, boxes, dict(layout.colors)), text, (x.id, y.id))


_OPS = {"keep": _keep, "add": _add, "remove": _remove, "recolor": _recolor, "resize": _resize, "move": _move,
        "swap": _swap}  # fmt: skip


# ---- helpers -----------------------------------------------------------------------------------------------------
def _boxes(layout: Layout) -> dict[str, list[Box]]:
    return {k: list(v) for k, v in layout.boxes.items()}


def _target(rng: random.Random, size: int) -> tuple[float, float]:
    return rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size


def _holds(graph: SceneGraph, boxes: dict[str, list[Box]], size: int) -> bool:
    """Every box inside the canvas, apart from the others, and every relation of `graph` holds."""
    return not _violations(graph, boxes, size)


def _distinct(graph: SceneGraph, obj: SceneObject, **attributes: str) -> bool:
    """Whether `obj` with `attributes` is still told apart from every other object (name + attributes)."""
    changed = replace(obj, attributes={**obj.attributes, **attributes}).signature()
    return all(o.signature() != changed for o in graph.objects if o.id != obj.id)


def _new_object(graph: SceneGraph, rng: random.Random) -> SceneObject:
    """A single object, a shape and color not yet in the scene together (its noun phrase is unambiguous)."""
    taken = {o.signature() for o in graph.objects}
    oid = next(f"o{i}" for i in range(len(graph) + 1) if f"o{i}" not in graph)
    while True:
        attrs = {"color": rng.choice(list(COLORS))}
        if rng.random() < 0.25:
            attrs["size"] = rng.choice(("small", "large"))
        obj = SceneObject(oid, rng.choice(SHAPES), 1, attrs)
        if obj.signature() not in taken:
            return obj


def _resized(box: Box, side: int, size: int) -> Box:
    """`box` resized to `side` about its center, its corner snapped to the layout grid (sprites stay sprites)."""
    margin, step = max(1, round(0.03 * size)), max(1, size // GRID)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2

    top = (size - 2 * margin - side) // step  # the last grid corner that keeps the box inside

    def snap(v: float) -> int:
        return margin + step * int(min(max(round((v - margin) / step), 0), top))

    x0, y0 = snap(cx - side / 2), snap(cy - side / 2)
    return (x0, y0, x0 + side, y0 + side)


__all__ = ["EDIT_OPS", "KEEP_TEXT", "LAYOUT_MARGIN", "Edit", "sample_edit"]
