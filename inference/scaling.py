"""Inference-time scaling: one search loop over PSIR streams, judged by a verifier.

    root = prompt context                                   (prefilled once, shared by every stream)
    for each of P streams (ReflectionFlow width):           forked from root, own seed
        for up to I iterations (depth):
            k candidates = forks of the stream's state,     (VisionDirector micro-grid)
                each advanced one PSIR step (text turn(s) + one image), each image scored by the verifier
            best candidate of the step -> the new state, unless its score is below the best earlier
                state's: then roll back to that state (BACKTRACK)
            the verifier's action: STOP ends the stream, RESTART goes back to root, BACKTRACK rolls back;
                its sub_prompt (if any) becomes the next step's forced `<refine>…</refine>` turn
    final = the best-scored image over every candidate of every stream

Every fork shares the KV cache of its prefix (inference.kv_cache): candidates and streams never recompute
the prompt or the steps they have in common. Costs (images, flow steps, tokens, wall time) are summed
over everything generated, rejected candidates included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from bagel_ft.trajectory import refine_text
from inference.engine import Engine
from inference.psir import DRAW, Cost, ForcedTurn, Stream, advance, start_stream
from inference.settings import PSIRSettings, ScalingSettings
from inference.verifiers import Critique, Verifier


@dataclass
class Candidate:
    stream: int  # which of the P streams
    iteration: int
    index: int  # which of the k candidates
    score: float | None  # None: the step drew no image (stopped / format failure)
    critique: Critique | None
    state: Stream = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "iteration": self.iteration,
            "index": self.index,
            "score": self.score,
            "critique": self.critique.to_dict() if self.critique else None,
            "stop_reason": self.state.stop_reason,
            "images": len(self.state.images),
        }


@dataclass
class SearchResult:
    best: Candidate | None  # the best-scored candidate overall (None if nothing was drawn)
    candidates: list[Candidate]  # every candidate, in the order they were made
    events: list[dict[str, Any]]  # per step: chosen candidate, rollback / restart / stop
    cost: Cost

    @property
    def image(self) -> Image.Image | None:
        return self.best.state.last_image if self.best else None


Script = Callable[[Stream], list[ForcedTurn]]  # forced turns for one candidate's step (tests / fixed policies)


def search(
    engine: Engine,
    prompt: str,
    verifier: Verifier,
    settings: PSIRSettings | None = None,
    scaling: ScalingSettings | None = None,
    seed: int = 0,
    script: Script | None = None,
) -> SearchResult:
    """The P x I x k search (module docstring) for one prompt."""
    settings, scaling = settings or PSIRSettings(), scaling or ScalingSettings()
    start = time.perf_counter()
    root = start_stream(engine, prompt, seed)
    candidates: list[Candidate] = []
    events: list[dict[str, Any]] = []
    cost = Cost()
    for p in range(scaling.streams):
        state = root.fork(seed=_seed(seed, p, 0, 0))
        best_state: Candidate | None = None
        forced: ForcedTurn | None = None
        for it in range(scaling.iterations):
            step: list[Candidate] = []
            for j in range(scaling.candidates):
                cand = state.fork(seed=_seed(seed, p, it + 1, j))
                turns = ([forced] if forced else []) + (script(cand) if script else [])
                drew = advance(engine, cand, settings, turns)
                cost.add(cand.cost)
                critique = verifier(prompt, cand.last_image, cand) if drew else None
                step.append(Candidate(p, it, j, critique.score if critique else None, critique, cand))
            candidates += step
            scored = [c for c in step if c.score is not None]
            if not scored:
                events.append({"stream": p, "iteration": it, "event": "no_image"})
                break
            best = max(scored, key=lambda c: c.score)
            action = best.critique.action
            event = {"stream": p, "iteration": it, "chosen": best.index, "score": best.score, "action": action}
            worse = best_state is not None and best.score < best_state.score
            if action == "RESTART":
                event["event"] = "restart"
                state = root.fork(seed=_seed(seed, p, it + 1, scaling.candidates))
            elif action == "BACKTRACK" or (scaling.rollback and worse):
                event["event"] = "rollback"  # to the best earlier state (the prompt if there is none)
                state = best_state.state if best_state else root.fork(seed=_seed(seed, p, it + 1, scaling.candidates))
            else:
                state, best_state = best.state, best
            if action == "STOP":
                event["event"] = "stop"
            events.append(event)
            if action == "STOP" or state.done:
                break
            sub_prompt = (
                best.critique.sub_prompt if scaling.use_sub_prompt and action in ("CONTINUE", "BACKTRACK") else ""
            )
            forced = ForcedTurn(text=refine_text(sub_prompt), decision=DRAW) if sub_prompt else None
    cost.wall_s = time.perf_counter() - start
    scored = [c for c in candidates if c.score is not None]
    best = max(scored, key=lambda c: c.score) if scored else None  # first of equals: the earliest
    return SearchResult(best, candidates, events, cost)


def _seed(seed: int, stream: int, iteration: int, index: int) -> int:
    """A distinct, reproducible seed per (stream, iteration, candidate)."""
    return ((seed * 1_000_003 + stream) * 10_007 + iteration) * 101 + index
