"""The shapes world's vocabulary: shape kinds, palette, sizes, counts and relations.

Colors are GenEval color words whose RGB values stay >= ~100 apart (Euclidean, 0-255) from each other
and >= ~115 from the mid-gray background, so nearest-palette classification survives noise and blur.
Sizes are the side of an instance's square box as a fraction of the canvas side; an object whose size
the graph leaves open is drawn `medium`. Objects sit on a coarse grid (`GRID` steps per canvas side): a
shape then has one look per size, the way sprites on a board do, instead of one per pixel offset; a
tiny generator learns such shapes in thousands of steps where free positions left it drawing blobs
(docs/results.md, "Base model trials, fourth session").
"""

from __future__ import annotations

from scene_graphs.schema import AXIS_PREDICATES, SceneGraph, SceneGraphError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 135, 0),
    "yellow": (245, 225, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "purple": (150, 40, 200),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
BACKGROUND = (140, 140, 140)
SIZES = ("small", "large")  # words a prompt may use
SIZE_FRACTION = {"small": 0.15, "medium": 0.2, "large": 0.27}  # box side / canvas side
GRID = 8  # boxes sit on a grid: their corners move in steps of canvas / GRID px (8 px at 64 px); see layout.py
MAX_COUNT = 4
RELATIONS = tuple(AXIS_PREDICATES)  # left of, right of, above, below
MIN_CANVAS, MAX_CANVAS = 32, 256


class ShapesError(SceneGraphError):
    """A graph outside the shapes world (unknown shape, color, size or predicate)."""


def check_shapes_graph(graph: SceneGraph) -> None:
    """Raise ShapesError naming the first object or relation the shapes world cannot draw."""
    for obj in graph.objects:
        where = f"object {obj.id!r}"
        if obj.name not in SHAPES:
            raise ShapesError(f"{where}.name: {obj.name!r} is not a shape; expected one of {SHAPES}")
        if obj.count > MAX_COUNT:
            raise ShapesError(f"{where}.count: {obj.count} > {MAX_COUNT}")
        for key, value in obj.attributes.items():
            if key == "color" and value not in COLORS:
                raise ShapesError(f"{where}.color: {value!r}; expected one of {tuple(COLORS)}")
            elif key == "size" and value not in SIZES:
                raise ShapesError(f"{where}.size: {value!r}; expected one of {SIZES}")
            elif key not in ("color", "size"):
                raise ShapesError(f"{where}.attributes: {key!r} is not a shapes attribute (color, size)")
    for rel in graph.relations:
        if rel.predicate not in RELATIONS:
            raise ShapesError(f"relation {rel.subject} {rel.predicate} {rel.object}: expected one of {RELATIONS}")
