"""Backends behind interfaces (base.py) and the one place that picks them from the config.

| part      | shapes (offline default)          | remote / model                                   |
|-----------|-----------------------------------|--------------------------------------------------|
| extractor | `ShapesExtractor` (grammar)       | `LLMExtractor` (SCENE_GRAPH_JSON_SCHEMA)         |
| editor    | `ShapesEditor` (keeps the layout) | `BagelEditor` (our ckpt), `KontextEditor`        |
| judge     | `ShapesJudge` (pixel check)       | `VLMJudge` (any OpenAI-compatible VLM)           |
| sampler   | `ShapesDrafter` (imperfect)       | `ModelSampler` (our ckpt's own PSIR streams)     |

The OpenAI-compatible parts share one `inference.endpoint.ChatClient`; the checkpoint parts share one
loaded model per (ckpt, device, dtype) and one `ModelRunner` (one model call at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from data_gen.backends.base import Canvas, ImageEditor, Judge, Judgement, SceneGraphExtractor, TrajectorySampler
from data_gen.backends.models import BagelEditor, KontextEditor, ModelRunner, ModelSampler
from data_gen.backends.remote import LLMExtractor, VLMJudge
from data_gen.backends.shapes import ShapesDrafter, ShapesEditor, ShapesExtractor, ShapesJudge
from data_gen.config import DataConfig
from data_gen.summary import Summary, add_usage
from inference.call_cache import CallCache
from inference.endpoint import ChatClient

__all__ = [
    "Backends",
    "Canvas",
    "ImageEditor",
    "Judge",
    "Judgement",
    "SceneGraphExtractor",
    "TrajectorySampler",
    "make_backends",
]


@dataclass
class Backends:
    extractor: SceneGraphExtractor
    editor: ImageEditor
    judge: Judge
    sampler: TrajectorySampler | None  # critiques only
    client: ChatClient | None  # the endpoint client, when a part uses one

    def names(self) -> dict[str, str]:
        parts = {"extractor": self.extractor, "editor": self.editor, "judge": self.judge, "sampler": self.sampler}
        return {k: v.name for k, v in parts.items() if v is not None}

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


def make_backends(cfg: DataConfig, cache: CallCache, summary: Summary, *, with_sampler: bool = False) -> Backends:
    """The configured parts (call inside the event loop that will use them). A checkpoint loads here."""
    b, size, repair = cfg.backends, cfg.pipeline.image_size, cfg.pipeline.repair_attempts
    client = None
    if b.extractor == "llm" or b.judge == "vlm":
        client = ChatClient(cfg.endpoint, cache, summary, on_usage=add_usage)
    extractor = LLMExtractor(client, repair) if b.extractor == "llm" else ShapesExtractor(cache)
    runner = ModelRunner()  # our checkpoints: one call at a time, editor and sampler alike
    shapes_editor = ShapesEditor(cache, size)
    editor = {
        "shapes": lambda: shapes_editor,
        "bagel": lambda: BagelEditor.from_checkpoint(cache, size, cfg.bagel_editor, runner),
        "kontext": lambda: KontextEditor(cache, size, cfg.kontext, runner),
    }[b.editor]()
    judge = VLMJudge(client, repair) if b.judge == "vlm" else ShapesJudge(cache)
    sampler = None
    if with_sampler:
        sampler = (
            ModelSampler.from_checkpoint(cache, size, cfg.model_sampler, runner, summary)
            if b.sampler == "model"
            else ShapesDrafter(
                cache, shapes_editor, cfg.shapes.mistake_prob, cfg.pipeline.min_steps, cfg.pipeline.max_steps
            )
        )
    return Backends(extractor, editor, judge, sampler, client)
