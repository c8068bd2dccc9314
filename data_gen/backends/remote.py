"""Backends on an OpenAI-compatible server (GPT-4o, or Qwen2.5-VL behind vLLM): a scene-graph extractor
and a VLM judge. Both ask for JSON-schema structured output through `ChatClient.complete_json`, so an
invalid reply is counted, repaired by re-asking with the error, and finally rejected — never kept.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from common.endpoint import ChatClient, image_part
from data_gen.backends.base import Judgement
from data_gen.errors import InvalidReply
from scene_graphs import SCENE_GRAPH_JSON_SCHEMA, SceneGraph, SceneGraphError, Step

EXTRACT_SYSTEM = (
    "You turn a text-to-image prompt into a scene graph. List every kind of object the prompt asks for "
    "(identical instances share one entry with a count), its color, size and material when the prompt states "
    "them (else null), and the spatial relations the prompt states between objects, by object id. "
    "Add nothing the prompt does not say. Reply with the JSON object only."
)
JUDGE_SYSTEM = (
    "You are a strict visual inspector for a drawing assistant. Compare the image with the text exactly: "
    "every object, count, color, size and spatial relation must match, and nothing else may be drawn. "
    "Reply with JSON only: verdict 'consistent' or 'inconsistent'; analysis: what is wrong (empty if "
    "consistent); fix: ONE short edit instruction that would make the image match (empty if consistent)."
)
PLAN_SYSTEM = (
    "You check the plan of a drawing assistant against the user's prompt. A plan step has an instruction "
    "and a description of the whole scene after it. An intermediate step is consistent when its scene is a "
    "part of the prompt's scene (nothing the prompt contradicts); the final step must be the whole prompt. "
    "Reply with JSON only: verdict, analysis (what is wrong, empty if consistent), fix (empty if consistent)."
)
JUDGEMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["consistent", "inconsistent"]},
        "analysis": {"type": "string"},
        "fix": {"type": "string"},
    },
    "required": ["verdict", "analysis", "fix"],
    "additionalProperties": False,
}


def schema_errors(data: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Violations of the JSON-schema subset our schemas use (type, properties, required,
    additionalProperties, items, enum) — enough to tell a schema violation from a semantic error."""
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else types
        if not any(_is_type(data, t) for t in allowed):
            return [f"{where}: expected {types}, got {type(data).__name__}"]
    if "enum" in schema and data not in schema["enum"]:
        return [f"{where}: {data!r} not one of {schema['enum']}"]
    errors = []
    if isinstance(data, dict):
        props = schema.get("properties", {})
        errors += [f"{where}.{k}: missing" for k in schema.get("required", []) if k not in data]
        if schema.get("additionalProperties") is False:
            errors += [f"{where}.{k}: not allowed" for k in data if k not in props]
        for k, sub in props.items():
            if k in data:
                errors += schema_errors(data[k], sub, f"{where}.{k}")
    if isinstance(data, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(data):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]")
    return errors


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "object": dict, "array": list, "boolean": bool, "null": type(None)}[name])


def parse_scene_graph(data: dict) -> SceneGraph:
    """An LLM's scene graph, via `SceneGraph.from_llm_json` (which repairs small slips). A reply it cannot
    read is `schema_violation` when it breaks SCENE_GRAPH_JSON_SCHEMA, else `invalid_scene_graph`."""
    try:
        graph = SceneGraph.from_llm_json(data)
    except SceneGraphError as e:
        errors = schema_errors(data, SCENE_GRAPH_JSON_SCHEMA)
        raise InvalidReply("schema_violation" if errors else "invalid_scene_graph", "; ".join(errors) or str(e)) from e
    if len(graph) == 0:
        raise InvalidReply("invalid_scene_graph", "no objects")
    return graph


def parse_judgement(data: dict) -> Judgement:
    errors = schema_errors(data, JUDGEMENT_SCHEMA)
    if errors:
        raise InvalidReply("schema_violation", "; ".join(errors))
    consistent = data["verdict"] == "consistent"
    if not consistent and not data["fix"].strip():
        raise InvalidReply("missing_fix", "an inconsistent verdict needs a fix")
    return Judgement(
        consistent, "" if consistent else data["analysis"].strip(), "" if consistent else data["fix"].strip()
    )


class LLMExtractor:
    name = "llm"

    def __init__(self, client: ChatClient, repair_attempts: int):
        self.client, self.repair_attempts = client, repair_attempts

    async def extract(self, prompt: str, seed: int) -> SceneGraph:
        messages = [{"role": "system", "content": EXTRACT_SYSTEM}, {"role": "user", "content": prompt}]
        return await self.client.complete_json(
            messages,
            schema=SCENE_GRAPH_JSON_SCHEMA,
            schema_name="scene_graph",
            validate=parse_scene_graph,
            repair_attempts=self.repair_attempts,
        )


class VLMJudge:
    name = "vlm"

    def __init__(self, client: ChatClient, repair_attempts: int):
        self.client, self.repair_attempts = client, repair_attempts

    async def judge_image(self, image: Image.Image, step: Step, seed: int) -> Judgement:
        text = f"Instruction: {step.instruction}\nThe whole scene should now be: {step.description}"
        messages = [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": [{"type": "text", "text": text}, image_part(image)]},
        ]
        return await self._ask(messages)

    async def judge_plan(self, prompt: str, step: Step, final: bool, seed: int) -> Judgement:
        text = (
            f"Prompt: {prompt}\n{'Final' if final else 'Intermediate'} step.\nInstruction: {step.instruction}\n"
            f"Description of the scene after it: {step.description}"
        )
        messages = [{"role": "system", "content": PLAN_SYSTEM}, {"role": "user", "content": text}]
        return await self._ask(messages)

    async def _ask(self, messages: list[dict]) -> Judgement:
        return await self.client.complete_json(
            messages,
            schema=JUDGEMENT_SCHEMA,
            schema_name="judgement",
            validate=parse_judgement,
            repair_attempts=self.repair_attempts,
        )
