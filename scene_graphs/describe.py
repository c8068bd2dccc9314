"""Deterministic English for scene graphs and for the steps between them.

* `describe(graph)`: the global description, e.g. "a red circle to the left of two blue squares".
  One clause per relation ("NP predicate NP"), then the objects no relation mentions, joined as
  "X, Y and Z". An object is introduced with an indefinite noun phrase ("a red circle", "two blue
  squares") and referred to afterwards definitely ("the blue squares").
* `instruction(op, before, after)`: the incremental instruction of one step, read off the diff of the
  two graphs: add ("draw ..." on an empty canvas, else "add ..."), modify ("make the red circle
  blue"), swap ("swap the red circle and the blue square"), remove ("remove the yellow triangle").

The shapes-world parser (`scene_graphs.shapes.parse`) reads exactly this grammar back. Noun phrases
assume objects are distinguishable by name + attributes (the shapes generator guarantees it).
"""

from __future__ import annotations

from collections.abc import Iterable

from scene_graphs.schema import ATTRIBUTE_ORDER, INVERSE, Relation, SceneGraph, SceneObject

NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
PREDICATE_PHRASES = {"left of": "to the left of", "right of": "to the right of"}  # others read as they are
IRREGULAR_PLURALS = {
    "person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice", "foot": "feet",
    "tooth": "teeth", "goose": "geese", "sheep": "sheep", "fish": "fish", "deer": "deer", "skis": "skis",
    "scissors": "scissors", "knife": "knives", "leaf": "leaves", "wolf": "wolves", "shelf": "shelves",
    "glasses": "glasses", "bus": "buses", "cactus": "cacti",
}  # fmt: skip


def pluralize(noun: str) -> str:
    """English plural of a (possibly multi-word) noun; the last word inflects."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        plural = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        plural = last + "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        plural = last[:-1] + "ies"
    else:
        plural = last + "s"
    return f"{head} {plural}" if head else plural


def number_word(n: int) -> str:
    return NUMBERS[n] if 0 <= n < len(NUMBERS) else str(n)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def adjectives(attributes: dict[str, str]) -> list[str]:
    """Attribute values in English adjective order: size, color, material, then the rest by key."""
    keys = [k for k in ATTRIBUTE_ORDER if k in attributes] + sorted(k for k in attributes if k not in ATTRIBUTE_ORDER)
    return [attributes[k] for k in keys]


def noun_phrase(obj: SceneObject, definite: bool = False, count: int | None = None) -> str:
    """'a small red circle' / 'two red circles' / 'the red circle' / 'the red circles'."""
    n = obj.count if count is None else count
    core = " ".join(adjectives(obj.attributes) + [obj.name if n == 1 else pluralize(obj.name)])
    if definite:
        return f"the {core}"
    return f"{article(core)} {core}" if n == 1 else f"{number_word(n)} {core}"


def predicate_phrase(predicate: str) -> str:
    return PREDICATE_PHRASES.get(predicate, predicate)


def join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _clauses(objects: list[SceneObject], relations: Iterable[Relation], known: set[str], lookup) -> list[str]:
    """Clauses introducing `objects` with `relations`; ids in `known` (and once mentioned) are definite."""
    mentioned = set(known)

    def np(object_id: str) -> str:
        obj = lookup(object_id)
        text = noun_phrase(obj, definite=object_id in mentioned)
        mentioned.add(object_id)
        return text

    clauses = [f"{np(r.subject)} {predicate_phrase(r.predicate)} {np(r.object)}" for r in relations]
    clauses += [np(o.id) for o in objects if o.id not in mentioned]
    return clauses


def describe(graph: SceneGraph) -> str:
    """The global description of the whole scene ("" for an empty graph)."""
    return join(_clauses(graph.objects, graph.relations, set(), graph.object))


# ---- step instructions ------------------------------------------------------------------------------------
def instruction(op: str, before: SceneGraph, after: SceneGraph) -> str:
    """The incremental instruction that turns the scene `before` into `after` (op: add/modify/swap/remove)."""
    if op == "add":
        return _add(before, after)
    if op == "modify":
        return _modify(before, after)
    if op == "swap":
        return _swap(before, after)
    if op == "remove":
        return _remove(before, after)
    raise ValueError(f"instruction: unknown op {op!r}; expected add, modify, swap or remove")


def _add(before: SceneGraph, after: SceneGraph) -> str:
    old = set(before.ids)
    new_objects = [o for o in after.objects if o.id not in old]
    new_rels = [r for r in after.relations if r not in set(before.relations)]
    # say "add a circle left of the square" rather than "add the square right of a circle"
    new_rels = [
        r.inverse() if r.subject in old and r.object not in old and r.predicate in INVERSE else r for r in new_rels
    ]
    parts = _clauses(new_objects, new_rels, old, after.object)
    for obj in after.objects:  # more instances of an object already drawn
        if obj.id in old and obj.count > before.object(obj.id).count:
            extra = obj.count - before.object(obj.id).count
            what = noun_phrase(obj, count=extra)
            parts.append(
                f"another {what.split(' ', 1)[1]}"
                if extra == 1
                else f"{number_word(extra)} more {what.split(' ', 1)[1]}"
            )
    verb = "draw" if not old else "add"
    return f"{verb} {join(parts)}" if parts else "keep the picture as it is"


def _modify(before: SceneGraph, after: SceneGraph) -> str:
    parts = []
    for obj in after.objects:
        if obj.id not in before:
            continue
        old = before.object(obj.id)
        if old.name != obj.name:
            parts.append(f"turn {noun_phrase(old, definite=True)} into {noun_phrase(obj)}")
        elif old.attributes != obj.attributes:
            changed = {k: v for k, v in obj.attributes.items() if old.attributes.get(k) != v}
            parts.append(f"make {noun_phrase(old, definite=True)} {' and '.join(adjectives(changed))}".rstrip())
    return join(parts) or "keep the picture as it is"


def _swap(before: SceneGraph, after: SceneGraph) -> str:
    pairs = []
    for r in after.relations:
        if r not in set(before.relations):
            pair = tuple(sorted((r.subject, r.object)))
            if pair not in pairs:
                pairs.append(pair)
    parts = [f"swap {noun_phrase(before.object(a), True)} and {noun_phrase(before.object(b), True)}" for a, b in pairs]
    return join(parts) or "keep the picture as it is"


def _remove(before: SceneGraph, after: SceneGraph) -> str:
    parts = []
    for obj in before.objects:
        if obj.id not in after:
            parts.append(noun_phrase(obj, definite=True))
        elif after.object(obj.id).count < obj.count:
            gone = obj.count - after.object(obj.id).count
            plural = noun_phrase(obj, definite=True)
            parts.append(f"one of {plural}" if gone == 1 else f"{number_word(gone)} of {plural}")
    return f"remove {join(parts)}" if parts else "keep the picture as it is"


# ---- why a rewrite step is there (for readers of a trajectory) --------------------------------------------------
LESSON = "the model learns to correct a picture, not only to add to it"


def explain_rewrite(steps: list[tuple[str, SceneGraph]], k: int) -> str:
    """Why step `k` (0-based) of a trajectory plan, a modify / swap / remove rewrite, is there, from the plan's
    (op, scene after the step) pairs (scene_graphs.subsample's faults: a wrong attribute, a reversed relation or
    a distractor drawn by an earlier step so that step k can teach undoing it). Steps are numbered from 1."""
    op, after = steps[k]
    before = steps[k - 1][1] if k > 0 else SceneGraph()

    def first(holds) -> str:
        j = next((i for i in range(k) if holds(steps[i][1])), None)
        return f"Step {j + 1}" if j is not None else "An earlier step"

    if op == "remove":
        gone = [o for o in before.objects if o.id not in after]
        if gone:
            obj = gone[0]
            return (f"{first(lambda g: obj.id in g)} draws a distractor the prompt does not ask for "
                    f"({noun_phrase(obj)}) so that step {k + 1} can teach removing it: {LESSON}.")  # fmt: skip
    if op == "modify":
        for obj in after.objects:
            wrong = before.object(obj.id) if obj.id in before else obj
            if wrong.attributes != obj.attributes or wrong.name != obj.name:
                drew = first(lambda g, w=wrong: w.id in g and g.object(w.id).signature() == w.signature())
                return (f"{drew} draws {noun_phrase(wrong)} where the prompt asks for {noun_phrase(obj)} so that "
                        f"step {k + 1} can teach correcting it: {LESSON}.")  # fmt: skip
    if op == "swap":
        for r in after.relations:
            if r not in set(before.relations):
                rev = Relation(r.object, r.predicate, r.subject)
                drew = first(lambda g, rev=rev: rev in set(g.relations))
                a, b = (noun_phrase(before.object(i), definite=True) for i in (rev.subject, rev.object))
                return (f"{drew} draws {a} {predicate_phrase(r.predicate)} {b}, the reverse of what the prompt asks, "
                        f"so that step {k + 1} can teach swapping them back: {LESSON}.")  # fmt: skip
    raise ValueError(f"explain_rewrite: step {k + 1} ({op!r}) undoes nothing an earlier step drew")
