"""Verifiers and critics for inference-time scaling, behind one interface.

A verifier looks at a prompt and a drawn image (and, when it needs it, the stream that drew it) and
returns a `Critique`: a score (higher is better; the scaling loop compares scores of the same
verifier only), an action — CONTINUE (draw another refinement), STOP (good enough), BACKTRACK (go back
to the best earlier state), RESTART (start the stream over) — and optionally a `sub_prompt`, the
corrective instruction for the next refinement step.

  * `SelfInspectVerifier`: the model's own inspect step. It appends `<|im_start|><inspect>` to a fork
    of the stream (which already holds the drawn image as clean VAE + ViT tokens) and reads the
    probability that the model continues with "consistent" rather than "inconsistent".
  * `ShapesJudge`: the shapes world's exact checker, `scene_graphs.shapes.check(image, parse_prompt(prompt))`.
  * `VLMCritic`: any OpenAI-compatible chat endpoint with image input, asked for JSON
    {"action": ..., "score": ..., "sub_prompt": ...}, through the shared client (`common.endpoint`:
    counted retries with backoff, image parts). The API key is read from the environment variable named
    in the config and is never logged or stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from common.endpoint import SyncChatClient, image_part, resolve_api_key
from inference.settings import CriticEndpoint

ACTIONS = ("CONTINUE", "STOP", "BACKTRACK", "RESTART")


@dataclass
class Critique:
    score: float  # higher is better
    action: str = "CONTINUE"  # one of ACTIONS
    sub_prompt: str = ""  # corrective instruction for the next refinement ("" = let the model decide)
    reasons: list[str] = field(default_factory=list)  # human-readable why

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "action": self.action, "sub_prompt": self.sub_prompt, "reasons": self.reasons}


class Verifier(Protocol):
    name: str

    def __call__(self, prompt: str, image: Image.Image, stream: Any = None) -> Critique:
        """Judge `image` drawn for `prompt`; `stream` is the `psir.Stream` that drew it (or None)."""
        ...


# ---- (1) the model's own inspect step ----------------------------------------------------------------
class SelfInspectVerifier:
    """Score = P("consistent") / (P("consistent") + P("inconsistent")) after `<|im_start|><inspect>`,
    read from teacher-forced log-probabilities on a fork of the stream (the stream itself is untouched).
    Without a stream, a fresh context prompt + image is built."""

    name = "self"

    def __init__(self, engine: Any, stop_above: float = 0.5):
        self.engine = engine
        self.stop_above = stop_above  # STOP when the model finds its image consistent with this probability

    def __call__(self, prompt: str, image: Image.Image, stream: Any = None) -> Critique:
        import math

        from bagel_ft.trajectory import TAGS

        engine = self.engine
        if stream is None:
            ctx = engine.new_context()
            engine.update_text(ctx, prompt)
            engine.update_image(ctx, image)
        else:
            ctx = stream.gen
        prefix = [engine.tokenizer.bos_id] + engine.tokenizer.encode(TAGS["inspect"][0])
        logp = engine.continuation_logprobs(
            ctx, prefix, [engine.tokenizer.encode(v) for v in ("consistent", "inconsistent")]
        )
        p_yes = 1.0 / (1.0 + math.exp(logp[1] - logp[0]))
        return Critique(
            score=p_yes,
            action="STOP" if p_yes > self.stop_above else "CONTINUE",
            reasons=[f"P(consistent)={p_yes:.3f}"],
        )


# ---- (2) the shapes-world judge ------------------------------------------------------------------------
class ShapesJudge:
    """The exact checker of the synthetic shapes world (engineer B's `scene_graphs.shapes`)."""

    name = "shapes"

    def __init__(self):
        from scene_graphs import shapes  # pure graph logic; imported only when this verifier is used

        self._shapes = shapes
        self._graphs: dict[str, Any] = {}

    def __call__(self, prompt: str, image: Image.Image, stream: Any = None) -> Critique:
        if prompt not in self._graphs:
            self._graphs[prompt] = self._shapes.parse_prompt(prompt)
        verdict = self._shapes.check(image, self._graphs[prompt])
        reasons = [str(r) for r in getattr(verdict, "reasons", [])]
        return Critique(
            score=float(verdict.score),
            action="STOP" if verdict.consistent else "CONTINUE",
            sub_prompt="; ".join(reasons),
            reasons=reasons,
        )


# ---- (3) an OpenAI-compatible VLM critic -------------------------------------------------------------------
CRITIC_INSTRUCTIONS = """You are a strict critic of text-to-image results.
Given the user's prompt and the current image, answer with one JSON object only:
{"action": "STOP" | "BACKTRACK" | "RESTART" | "CONTINUE", "score": <0..1, how well the image matches the prompt>,
 "sub_prompt": "<one corrective instruction for the next edit, or empty>"}
STOP: the image satisfies the prompt. CONTINUE: fixable by the sub_prompt edit. BACKTRACK: the last edit made
it worse. RESTART: start over."""


class VLMCritic:
    name = "vlm"

    def __init__(self, endpoint: CriticEndpoint):
        if not endpoint.base_url or not endpoint.model:
            raise ValueError("VLMCritic needs endpoint.base_url and endpoint.model")
        self.endpoint = endpoint
        self._key = resolve_api_key(endpoint.api_key_env, endpoint.base_url, optional_for_local=True)
        self._client: SyncChatClient | None = None  # started on the first call

    def __repr__(self) -> str:  # never show the key
        return f"VLMCritic(base_url={self.endpoint.base_url!r}, model={self.endpoint.model!r})"

    def __call__(self, prompt: str, image: Image.Image, stream: Any = None) -> Critique:
        if self._client is None:
            self._client = SyncChatClient(self.endpoint, name="critic", api_key=self._key)
        reply = self._client.complete(
            [
                {"role": "system", "content": CRITIC_INSTRUCTIONS},
                {"role": "user", "content": [{"type": "text", "text": f"Prompt: {prompt}"}, image_part(image)]},
            ]
        )
        return parse_critique(reply.text)


def parse_critique(text: str) -> Critique:
    """The critic's reply -> Critique. Tolerates prose or code fences around the JSON object; a reply
    without a usable object is a score-0 CONTINUE whose reason says so (never an exception)."""
    match = re.search(r"\{.*\}", text, flags=re.S)
    try:
        data = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return Critique(score=0.0, reasons=[f"critic reply is not a JSON object: {text[:200]!r}"])
    action = str(data.get("action", "CONTINUE")).upper()
    reasons = []
    if action not in ACTIONS:
        reasons.append(f"unknown action {action!r}, treated as CONTINUE")
        action = "CONTINUE"
    try:
        score = float(data.get("score", 0.0))
    except (TypeError, ValueError):
        score, reasons = 0.0, reasons + [f"score {data.get('score')!r} is not a number"]
    return Critique(score=score, action=action, sub_prompt=str(data.get("sub_prompt") or ""), reasons=reasons)


def build_verifier(name: str, engine: Any = None, endpoint: CriticEndpoint | None = None) -> Verifier:
    """`self` | `shapes` | `vlm` -> a verifier."""
    if name == "self":
        return SelfInspectVerifier(engine)
    if name == "shapes":
        return ShapesJudge()
    if name == "vlm":
        return VLMCritic(endpoint or CriticEndpoint())
    raise ValueError(f"verifier: expected one of self, shapes, vlm; got {name!r}")
