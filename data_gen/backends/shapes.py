"""The shapes world as data-synthesis backends (offline, exact, the embedded default).

* `ShapesExtractor`: the prompt grammar's parser (`scene_graphs.shapes.parse_prompt`).
* `ShapesEditor`: renders a step's graph, keeping the previous step's layout; for a whole trajectory
  (`blank(steps)`) it draws towards the planned final layout, so objects never move between steps.
* `ShapesJudge`: the pixel judge (`check`) for images; for plans, the description's graph must be a part
  of the prompt's graph (all of it on the final step). Its analysis and fix are written from what was
  detected: "the circle is blue, not red" / "make the blue circle red", "move ...", "add ...", "remove ...".
* `ShapesDrafter`: the imperfect drafter, a real data source for critiques: it draws the plan of a prompt
  and, with probability `mistake_prob` per trajectory, draws one step with a realistic mistake
  (perturb.py: wrong color, wrong relation, wrong count, missing object). It stands in for sampling a
  checkpoint (`models.ModelSampler`) until one exists; the critiques pipeline treats both alike.

Every call goes through the call cache like a remote one (endpoint names `shapes.*`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from bagel_ft.trajectory import Trajectory, Turn, plan_text
from common.call_cache import CallCache, image_text, text_image
from common.images import image_to_png
from data_gen.backends.base import Canvas, Judgement
from data_gen.errors import Rejected
from data_gen.perturb import perturb_any
from data_gen.shards import derive_seed
from scene_graphs import SceneGraph, Step, describe, plan_steps
from scene_graphs.describe import join, noun_phrase, number_word, pluralize, predicate_phrase
from scene_graphs.schema import INVERSE, Relation, SceneObject
from scene_graphs.shapes import (
    Detection,
    Layout,
    LayoutError,
    ParseError,
    ShapesError,
    Verdict,
    check,
    parse_prompt,
    render,
    solve_layout,
)
from scene_graphs.shapes.judge import compatible
from scene_graphs.shapes.layout import step_plans
from scene_graphs.shapes.vocab import BACKGROUND


def parse_cached(cache: CallCache, text: str) -> SceneGraph:
    """`parse_prompt(text)` through the cache; Rejected("unparseable_prompt") outside the grammar."""
    value = cache.memo("shapes.parse", {"text": text}, lambda: _parse_json(text))
    if "error" in value:
        raise Rejected("unparseable_prompt", value["error"])
    return SceneGraph.from_json(value["graph"])


def _parse_json(text: str) -> dict:
    try:
        return {"graph": parse_prompt(text).to_json()}
    except ParseError as e:
        return {"error": str(e)}


class ShapesExtractor:
    name = "shapes"

    def __init__(self, cache: CallCache):
        self.cache = cache

    async def extract(self, prompt: str, seed: int) -> SceneGraph:
        return parse_cached(self.cache, prompt)


@dataclass
class ShapesState:
    """The shapes editor's canvas state: the layout drawn so far, and the per-step plans of the trajectory
    being drawn (`render_steps`' planned layouts: objects take their final places from the start)."""

    layout: Layout | None = None
    plans: list[Layout] | None = None
    step: int = 0  # index of the next step into `plans`


class ShapesEditor:
    name = "shapes"

    def __init__(self, cache: CallCache, size: int):
        self.cache, self.size = cache, size

    def blank(self, steps: list[Step], seed: int) -> Canvas:
        graphs = [s.graph for s in steps]
        try:
            plans = step_plans(graphs, solve_layout(graphs[-1], self.size, seed))
        except ShapesError as e:  # LayoutError included
            raise Rejected("layout_failed" if isinstance(e, LayoutError) else "outside_shapes_world", str(e)) from e
        return Canvas(Image.new("RGB", (self.size, self.size), BACKGROUND), ShapesState(plans=plans))

    async def edit(self, prev: Canvas | None, step: Step, seed: int) -> Canvas:
        graph = step.graph if step.graph is not None else parse_cached(self.cache, step.description)
        state = prev.state if prev is not None else None
        if isinstance(state, dict):  # a layout from a sampler's meta (Layout.to_json)
            state = ShapesState(Layout.from_json(state))
        state = state or ShapesState()
        plan = state.plans[state.step] if state.plans and state.step < len(state.plans) else None
        request = {
            "graph": graph.to_json(),
            "size": self.size,
            "seed": seed,
            "layout": state.layout.to_json() if state.layout else None,
            "plan": plan.to_json() if plan else None,
        }
        value = self.cache.memo("shapes.render", request, lambda: self._render(graph, seed, state.layout, plan))
        if "error" in value:
            raise Rejected(value["error"], value["detail"])
        return Canvas(
            text_image(value["png"]), ShapesState(Layout.from_json(value["layout"]), state.plans, state.step + 1)
        )

    def _render(self, graph: SceneGraph, seed: int, layout: Layout | None, plan: Layout | None) -> dict:
        try:
            image, drawn = render(graph, self.size, seed, layout=layout, plan=plan)
        except LayoutError as e:
            return {"error": "layout_failed", "detail": str(e)}
        except ShapesError as e:
            return {"error": "outside_shapes_world", "detail": str(e)}
        return {"png": image_text(image), "layout": drawn.to_json()}


class ShapesJudge:
    name = "shapes"

    def __init__(self, cache: CallCache):
        self.cache = cache

    async def judge_image(self, image: Image.Image, step: Step, seed: int) -> Judgement:
        try:
            graph = step.graph if step.graph is not None else parse_cached(self.cache, step.description)
        except Rejected:
            return Judgement(False, f"the description {step.description!r} is not a scene the judge can read")
        request = {"image": image_to_png(image), "graph": graph.to_json()}
        return Judgement(
            **self.cache.memo("shapes.check", request, lambda: explain(check(image, graph), graph).to_json())
        )

    async def judge_plan(self, prompt: str, step: Step, final: bool, seed: int) -> Judgement:
        whole = parse_cached(self.cache, prompt)
        try:
            part = step.graph if step.graph is not None else parse_cached(self.cache, step.description)
        except Rejected:
            return Judgement(False, f"the description {step.description!r} is not a scene description")
        problems = plan_problems(part, whole, final)
        return Judgement(not problems, _sentence(problems), score=None)


class ShapesDrafter:
    """The imperfect drafter (see the module docstring); `meta["mistakes"]` records what it got wrong."""

    name = "shapes-drafter"

    def __init__(self, cache: CallCache, editor: ShapesEditor, mistake_prob: float, min_steps: int, max_steps: int):
        self.cache, self.editor = cache, editor
        self.mistake_prob, self.min_steps, self.max_steps = mistake_prob, min_steps, max_steps

    async def sample(self, prompt: str, seed: int) -> Trajectory:
        graph = parse_cached(self.cache, prompt)
        rng = random.Random(derive_seed(seed, "drafter"))
        steps = plan_steps(graph, seed, min_steps=self.min_steps, max_steps=self.max_steps, edit_prob=0.0)
        wrong_step = rng.randrange(len(steps)) if rng.random() < self.mistake_prob else None
        turns, images, mistakes, states = [], [], [], []
        canvas = self.editor.blank(steps, derive_seed(seed, "draw"))
        for k, step in enumerate(steps):
            drawn = step
            if k == wrong_step and (mistake := perturb_any(step.graph, rng)) is not None:
                kind, wrong = mistake
                drawn = Step(step.op, wrong, step.instruction, step.description)
                mistakes.append({"step": k, "kind": kind, "drawn": describe(wrong)})
            canvas = await self.editor.edit(canvas, drawn, derive_seed(seed, "draw"))
            turns += [Turn("plan", plan_text(step.instruction, step.description)), Turn("image", image=len(images))]
            images.append(canvas.image)
            states.append(canvas.state.layout.to_json())
        meta = {"seed": seed, "source": self.name, "mistakes": mistakes, "editor_state": states}
        return Trajectory(prompt, turns, images, subset="trajectory", meta=meta)


# ---- plans against the prompt ------------------------------------------------------------------------------
def plan_problems(part: SceneGraph, whole: SceneGraph, final: bool) -> list[str]:
    """What makes `part` (a plan step's scene) not a part of `whole` (all of it when `final`)."""
    problems, match = [], {}
    for obj in part.objects:
        same = [w for w in whole.objects if w.signature() == obj.signature()]
        if not same:
            problems.append(f"the prompt asks for no {_core(obj, 1)}")
            continue
        target = same[0]
        match[obj.id] = target.id
        if obj.count > target.count or (final and obj.count < target.count):
            problems.append(f"the prompt asks for {noun_phrase(target)}, not {number_word(obj.count)}")
    for rel in part.relations:
        if rel.subject in match and rel.object in match:
            mapped = Relation(match[rel.subject], rel.predicate, match[rel.object])
            if not _has_relation(whole, mapped):
                a, b = part.object(rel.subject), part.object(rel.object)
                problems.append(
                    f"the prompt does not put {noun_phrase(a, True)} {predicate_phrase(rel.predicate)} "
                    f"{noun_phrase(b, True)}"
                )
    if final:
        problems += [
            f"{noun_phrase(w)} from the prompt is missing" for w in whole.objects if w.id not in match.values()
        ]
        inverse = {v: k for k, v in match.items()}
        for rel in whole.relations:
            if rel.subject in inverse and rel.object in inverse:
                if not _has_relation(part, Relation(inverse[rel.subject], rel.predicate, inverse[rel.object])):
                    problems.append(
                        f"the plan does not put {noun_phrase(whole.object(rel.subject), True)} "
                        f"{predicate_phrase(rel.predicate)} {noun_phrase(whole.object(rel.object), True)}"
                    )
    return problems


def _has_relation(graph: SceneGraph, rel: Relation) -> bool:
    rels = set(graph.relations)
    return rel in rels or (rel.predicate in INVERSE and rel.inverse() in rels)


# ---- verdicts in words -----------------------------------------------------------------------------------------
def explain(verdict: Verdict, graph: SceneGraph) -> Judgement:
    """The judge's verdict as an analysis and one corrective instruction, read off the detections."""
    if verdict.consistent:
        return Judgement(True, score=verdict.score)
    dets = verdict.detections
    unexpected = [d for d in dets if not any(compatible(d, o) for o in graph.objects)]
    found = {o.id: sum(compatible(d, o) for d in dets) for o in graph.objects}
    analysis, fixes = [], []
    for obj in graph.objects:
        n, want = found[obj.id], obj.count
        if n > want:
            extra = n - want
            analysis.append(f"there are {number_word(n)} {_core(obj, n)}, not {number_word(want)}")
            fixes.append(f"remove {'one' if extra == 1 else number_word(extra)} of the {_core(obj, n)}")
            continue
        lack = want - n
        groups: dict[tuple, list[Detection]] = {}  # right shape, wrong color / size: grouped by what was drawn
        for d in [d for d in unexpected if d.shape == obj.name][:lack]:
            unexpected.remove(d)
            lack -= 1
            drawn = tuple((k, getattr(d, k)) for k, v in obj.attributes.items() if getattr(d, k, v) != v)
            groups.setdefault(drawn, []).append(d)
        for drawn, ds in groups.items():
            got = " and ".join(v for _, v in drawn)
            should = " and ".join(obj.attributes[k] for k, _ in drawn)
            if len(ds) == 1:
                analysis.append(f"the {obj.name} is {got}, not {should}")
                fixes.append(f"make the {_det_words(ds[0])} {should}")
            else:
                analysis.append(f"{number_word(len(ds))} {pluralize(obj.name)} are {got}, not {should}")
                fixes.append(f"make the {got} {pluralize(obj.name)} {should}")
        if lack:
            analysis.append(
                f"{noun_phrase(obj, count=lack)} {'is' if lack == 1 else 'are'} missing"
                if n == 0
                else f"there {'is' if n == 1 else 'are'} only {number_word(n)} {_core(obj, n)}, not {number_word(want)}"
            )
            fixes.append(_add_instruction(obj, lack, n, graph, found))
    relation_reqs = [r for r in verdict.requirements if r.kind == "relation"]
    for rel, req in zip(graph.relations, relation_reqs, strict=True):
        if req.ok is False and found[rel.subject] and found[rel.object]:
            a, b = graph.object(rel.subject), graph.object(rel.object)
            what = f"{noun_phrase(a, True)} {predicate_phrase(rel.predicate)} {noun_phrase(b, True)}"
            analysis.append(
                f"{noun_phrase(a, True)} {'is' if a.count == 1 else 'are'} not "
                f"{predicate_phrase(rel.predicate)} {noun_phrase(b, True)}"
            )
            fixes.append(f"move {what}")
    extra: dict[str, int] = {}
    for d in unexpected:
        extra[_det_words(d)] = extra.get(_det_words(d), 0) + 1
    for words, n in extra.items():
        if n == 1:
            analysis.append(f"there is an unexpected {words}")
            fixes.append(f"remove the {words}")
        else:
            analysis.append(f"there are {number_word(n)} unexpected {pluralize(words)}")
            fixes.append(f"remove the {pluralize(words)}")
    if not fixes:  # nothing the detections explain (should not happen): fall back on the judge's reasons
        analysis, fixes = verdict.reasons, [f"redraw the scene as {describe(graph)}"]
    return Judgement(False, _sentence(analysis), join(fixes), score=verdict.score)


def _core(obj: SceneObject, n: int) -> str:
    """'red circles' / 'red circle': the noun phrase without its determiner, in the number of `n`."""
    return noun_phrase(obj, count=n).split(" ", 1)[1]


def _det_words(d: Detection) -> str:
    words = [w for w in (d.color, d.shape) if w != "unknown"]
    return " ".join(words) if d.shape != "unknown" else " ".join(words + ["shape"])


def _add_instruction(obj: SceneObject, lack: int, have: int, graph: SceneGraph, found: dict[str, int]) -> str:
    if have:
        return f"add another {_core(obj, 1)}" if lack == 1 else f"add {number_word(lack)} more {_core(obj, lack)}"
    what = noun_phrase(obj)
    for rel in graph.relations_of(obj.id):  # anchor the new object on one that is already there
        other = rel.object if rel.subject == obj.id else rel.subject
        if found[other]:
            pred = rel.predicate if rel.subject == obj.id else INVERSE.get(rel.predicate, rel.predicate)
            return f"add {what} {predicate_phrase(pred)} {noun_phrase(graph.object(other), True)}"
    return f"add {what}"


def _sentence(parts: list[str]) -> str:
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "." if text else ""
