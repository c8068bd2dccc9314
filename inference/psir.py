"""The native PSIR loop: the model alternates text and images on its own (docs/format.md section 3).

    prompt segment
    repeat:
        text turn   <|im_start|> … <|im_end|>  (plan <ins>…</ins><des>…</des>, inspect, or refine)
        decision    logits at the <|im_end|> position: <|vision_start|> -> draw, <|endoftext|> -> stop
                    ("three_way" also reads <|im_start|> -> another text turn; see `DECISIONS`)
        draw        flow-matching generation with CFG, then the image enters the context as clean VAE
                    + ViT tokens, exactly like a generated image in training
    until stop, a budget runs out, or a turn breaks the format (recorded, never a hang).

CFG contexts follow the official interleaved inferencer: `cfg_text` is the stream before its last text
(forked in O(1) before every text), `cfg_img` holds only the texts (prompt and text turns, own RoPE ids).

For tests and for critics that dictate the next instruction, a turn can be forced (`ForcedTurn`): its
whole text, a prefix the model completes (constrained decoding), and/or the decision.

Every step is a program (`inference.batching.batchable`): `run_psir(engine, ...)` runs one stream alone;
`run_batched(engine, [run_psir.steps(engine, ...), ...], batch_size)` runs many streams in the same forwards
(one decodes while another draws; each with its own seed, so each stream is the one it would be alone).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from bagel_ft.trajectory import TAGS, FormatError, Trajectory, Turn, check_tags
from inference.batching import Steps, batchable, gather
from inference.engine import Context, Engine
from inference.sampling import argmax_among
from inference.settings import DECISIONS, FlowSettings, PSIRSettings

DRAW, STOP, TEXT = "draw", "stop", "text"


@dataclass
class Cost:
    """What a prompt cost (summed over streams and candidates in scaled mode)."""

    images: int = 0  # images generated (drafts and rejected candidates included)
    flow_steps: int = 0  # Euler steps (each runs 1-3 CFG forwards)
    tokens: int = 0  # text tokens generated
    wall_s: float = 0.0  # seconds

    def add(self, other: Cost) -> Cost:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self


@dataclass
class ForcedTurn:
    """Force (part of) a text turn: `text` replaces decoding; `prefix` is forced, the model completes it;
    `decision` (draw | stop | text) overrides the logits."""

    text: str | None = None
    prefix: str = ""
    decision: str | None = None


@dataclass
class Stream:
    """One PSIR stream: its contexts and everything it produced. `fork()` shares the caches (O(1))."""

    prompt: str
    gen: Context  # the whole stream
    cfg_text: Context  # the stream before its last text (text CFG)
    cfg_img: Context  # the texts only (image CFG)
    generator: torch.Generator  # text sampling and flow noise
    turns: list[Turn] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # every text step, as decoded
    cost: Cost = field(default_factory=Cost)
    done: bool = False
    stop_reason: str = ""  # end_of_text | max_steps | max_images | max_tokens | format_failure | single
    failure: dict[str, Any] | None = None
    subset: str = "trajectory"  # of the record it becomes ("t2i" for single mode)

    def fork(self, seed: int | None = None) -> Stream:
        """An independent continuation (new sampling seed if given); the cost so far is not duplicated."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else _copy_generator(self.generator)
        return Stream(
            self.prompt,
            self.gen.fork(),
            self.cfg_text.fork(),
            self.cfg_img.fork(),
            gen,
            list(self.turns),
            list(self.images),
            [dict(s) for s in self.steps],
            Cost(),
            self.done,
            self.stop_reason,
            self.failure,
            self.subset,
        )

    @property
    def last_image(self) -> Image.Image | None:
        return self.images[-1] if self.images else None

    def to_trajectory(self, meta: dict[str, Any] | None = None) -> Trajectory:
        meta = {
            "steps": self.steps,
            "cost": asdict(self.cost),
            "stop_reason": self.stop_reason,
            "failure": self.failure,
            **(meta or {}),
        }
        if self.failure is None:
            meta.pop("failure")
        return Trajectory(
            prompt=self.prompt, turns=list(self.turns), images=list(self.images), subset=self.subset, meta=meta
        )


def _copy_generator(g: torch.Generator) -> torch.Generator:
    out = torch.Generator(device=g.device)
    out.set_state(g.get_state())
    return out


# ---- the steps --------------------------------------------------------------------------------------------


@batchable
def start_stream(engine: Engine, prompt: str, seed: int = 0) -> Steps[Stream]:
    """The prompt segment in the full context and in the texts-only context (one tick)."""
    gen = engine.new_context()
    cfg_text = gen.fork()  # before the prompt
    cfg_img = engine.new_context()
    yield from gather(engine.update_text.steps(gen, prompt), engine.update_text.steps(cfg_img, prompt))
    return Stream(prompt, gen, cfg_text, cfg_img, torch.Generator().manual_seed(seed))


def classify(text: str) -> tuple[str | None, str]:
    """(role, problem) of a decoded text turn: plan / inspect / refine by its tags, or (None, why)."""
    try:
        check_tags(text, "text turn")
    except FormatError as e:
        return None, str(e)
    if TAGS["inspect"][0] in text:
        return "inspect", ""
    if TAGS["refine"][0] in text:
        return "refine", ""
    if TAGS["ins"][0] in text or TAGS["des"][0] in text:
        return "plan", ""
    return None, "no PSIR tags (<ins>/<des>, <inspect>, <refine>) in the text turn"


UNBALANCED = re.compile(r"unbalanced <(\w+)> tags")  # check_tags' reason
QUOTE_CHARS = 120  # of the failing turn's text, in a failure sentence


def describe_failure(failure: dict[str, Any]) -> str:
    """A format failure (`Stream.failure`: step, reason, text, as `text_turn` records them) as a sentence for a
    reader, e.g. "The stream stopped at text turn 3: the turn opened <ins> once but closed it 0 times. It wrote:
    '<ins>draw a red'"."""
    reason, text = str(failure.get("reason", "")), str(failure.get("text", ""))
    tag = UNBALANCED.search(reason)
    if tag:
        open_, close = TAGS.get(tag[1], (f"<{tag[1]}>", f"</{tag[1]}>"))
        why = f"the turn opened {open_} {_times(text.count(open_))} but closed it {_times(text.count(close))}"
        if len(text) >= 500 or text.count(open_) == text.count(close):  # the recorded text is cut: counts unknown
            why = f"the turn had an unbalanced {open_} tag"
    elif reason.startswith("unterminated"):
        why = "the turn never ended" + (f" ({reason.split(': ', 1)[1]})" if ": " in reason else "")
    elif reason.startswith("no PSIR tags"):
        why = "the turn had none of the PSIR tags (<ins>/<des> of a plan, <inspect>, <refine>)"
    else:
        why = reason or "no reason recorded"
    where = f" at text turn {failure['step'] + 1}" if isinstance(failure.get("step"), int) else ""
    flat = " ".join(text.split())
    quote = f"'{flat[:QUOTE_CHARS]}{'…' if len(flat) > QUOTE_CHARS else ''}'" if flat else "nothing"
    return f"The stream stopped{where}: {why}. It wrote: {quote}."


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def decide(engine: Engine, logits: torch.Tensor, decision: str) -> str:
    """The draw / stop (/ text) decision from the logits after `<|im_end|>`."""
    tok = engine.tokenizer
    options = {tok.vision_start_id: DRAW, tok.end_of_text_id: STOP}
    if decision == "three_way":
        options[tok.bos_id] = TEXT
    elif decision != "two_way":
        raise ValueError(f"decision: expected one of {DECISIONS}, got {decision!r}")
    return options[argmax_among(logits, list(options))]


@batchable
def text_turn(engine: Engine, stream: Stream, settings: PSIRSettings, forced: ForcedTurn | None = None) -> Steps[str]:
    """Decode one text turn into the stream -> the decision (draw / stop / text); a format failure ends
    the stream (stop_reason "format_failure", `failure` says why) and returns stop."""
    tok, budget = engine.tokenizer, settings.budget
    forced = forced or ForcedTurn()
    stream.cfg_text = stream.gen.fork()  # the state before this text
    if forced.text is not None:
        prefix = tok.encode(forced.text) + [tok.eos_id]
    else:
        prefix = tok.encode(forced.prefix)
    room = budget.max_tokens - stream.cost.tokens
    limit = min(settings.text.max_tokens, room)
    out = yield from engine.decode_text.steps(
        stream.gen, replace(settings.text, max_tokens=max(limit, len(prefix))), stream.generator, prefix=prefix
    )
    stream.cost.tokens += len(out.ids)
    body = out.ids[:-1] if out.finished else out.ids
    text = tok.decode(body, skip_special_tokens=True)
    step = {
        "index": len(stream.steps),
        "text": text,
        "tokens": len(out.ids),
        "finished": out.finished,
        "forced": forced.text is not None or bool(forced.prefix),
    }
    stream.steps.append(step)
    role, problem = (
        classify(text) if out.finished else (None, f"unterminated text: no <|im_end|> within {limit} tokens")
    )
    if role is None:
        stream.failure = {"step": step["index"], "reason": problem, "text": text[:500]}
        return _end(stream, "format_failure")
    step["role"] = role
    stream.turns.append(Turn(role=role, text=text, loss=True))
    if settings.flow.cfg_img_scale > 1.0:
        yield from engine.update_text.steps(stream.cfg_img, body)
    decision = forced.decision or decide(engine, out.last_logits, settings.decision)
    step["decision"] = decision
    return decision


@batchable
def draw(engine: Engine, stream: Stream, flow: FlowSettings, as_context: bool = True) -> Steps[Image.Image]:
    """Generate an image at the end of the stream and (unless the stream ends here) add it as context:
    clean VAE + ViT tokens, like a generated image in training."""
    image = yield from engine.generate_image.steps(stream.gen, stream.cfg_text, stream.cfg_img, flow, stream.generator)
    if as_context:
        yield from engine.update_image.steps(stream.gen, image)
    stream.images.append(image)
    stream.turns.append(Turn(role="image", image=len(stream.images) - 1, loss=True))
    stream.cost.images += 1
    stream.cost.flow_steps += flow.num_timesteps - 1
    return image


def _end(stream: Stream, reason: str) -> str:
    stream.done, stream.stop_reason = True, reason
    return STOP


@batchable
def advance(
    engine: Engine, stream: Stream, settings: PSIRSettings, script: list[ForcedTurn] | None = None
) -> Steps[bool]:
    """Run text turns until one image is drawn (True) or the stream ends (False). `script` is consumed
    from the front, one entry per text turn."""
    budget = settings.budget
    while not stream.done:
        if len(stream.steps) >= budget.max_steps:
            _end(stream, "max_steps")
            break
        if stream.cost.tokens >= budget.max_tokens:
            _end(stream, "max_tokens")
            break
        decision = yield from text_turn.steps(engine, stream, settings, script.pop(0) if script else None)
        if stream.done:
            break
        if decision == DRAW:
            if len(stream.images) >= budget.max_images:
                _end(stream, "max_images")
                break
            yield from draw.steps(engine, stream, settings.flow)
            return True
        if decision == STOP:
            _end(stream, "end_of_text")
    return False


@batchable
def run_psir(
    engine: Engine,
    prompt: str,
    settings: PSIRSettings | None = None,
    seed: int = 0,
    script: list[ForcedTurn] | None = None,
) -> Steps[Stream]:
    """The whole loop for one prompt -> the finished stream (`.to_trajectory()`, `.last_image`, `.cost`)."""
    settings = settings or PSIRSettings()
    start = time.perf_counter()
    stream = yield from start_stream.steps(engine, prompt, seed)
    script = list(script or [])
    while not stream.done:
        yield from advance.steps(engine, stream, settings, script)
    stream.cost.wall_s += time.perf_counter() - start
    return stream


@batchable
def run_single(engine: Engine, prompt: str, flow: FlowSettings | None = None, seed: int = 0) -> Steps[Stream]:
    """Plain text-to-image (official t2i): prompt, then one image; cfg_text = the empty context."""
    flow = flow or FlowSettings()
    start = time.perf_counter()
    stream = yield from start_stream.steps(engine, prompt, seed)
    stream.subset = "t2i"
    yield from draw.steps(engine, stream, flow, as_context=False)
    stream.done, stream.stop_reason = True, "single"
    stream.cost.wall_s += time.perf_counter() - start
    return stream


# The release's image-editing settings (the size is the input image's).
EDIT_FLOW = FlowSettings(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


@batchable
def run_edit(
    engine: Engine, image: Image.Image, instruction: str, flow: FlowSettings | None = None, seed: int = 0
) -> Steps[tuple[Image.Image, Cost]]:
    """Image editing (official interleaved inferencer with [image, instruction]): the image as context
    (clean VAE + ViT), the instruction, then one image of the input's size. cfg_text = the image only,
    cfg_img = the instruction only."""
    start = time.perf_counter()
    gen = engine.new_context()
    yield from engine.update_image.steps(gen, image)
    cfg_text = gen.fork()
    cfg_img = engine.new_context()
    yield from gather(engine.update_text.steps(gen, instruction), engine.update_text.steps(cfg_img, instruction))
    _, height, width = engine.prepare_image(image, "vae").shape
    flow = replace(flow or EDIT_FLOW, height=height, width=width)
    stream = Stream(instruction, gen, cfg_text, cfg_img, torch.Generator().manual_seed(seed))
    edited = yield from draw.steps(engine, stream, flow, as_context=False)
    stream.cost.wall_s += time.perf_counter() - start
    return edited, stream.cost
