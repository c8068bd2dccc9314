"""WISE (Niu et al. 2025, github PKU-YuanGroup/WISE): world-knowledge T2I, judged by a VLM.

  <out>/images/{prompt_id}.png          one image per prompt (the layout WISE's gpt_eval.py reads)
  <out>/gen/{prompt_id}.json            ours: seed + cost (+ trajectory path) of the image
  <out>/trajectories/{prompt_id}.traj/  ours: the PSIR trajectory, when the generator returns one
  <out>/judge_cache/calls.sqlite        judge replies, keyed by the full request (common.call_cache)
  <out>/scores_results.jsonl            WISE's own score file format (999 = not scored): their
                                        wise_*.py scripts run on it unchanged
  <out>/records.jsonl, summary.json     ours (see eval/run_dir.py)

The judge is any OpenAI-compatible chat endpoint (`JudgeConfig`; WISE used gpt-4o-2024-05-13), called
through `common.endpoint` (the client data_gen uses) with WISE's `gpt_eval.py` messages verbatim
(`build_messages`) at temperature 0 and parsed with its regex (`extract_scores`). WiScore = (0.7 C + 0.2 R + 0.1 A) / 2 per image, averaged per category;
overall = 0.4 culture + 0.167 time + 0.133 space + 0.1 (biology + physics + chemistry).

Where we depart from gpt_eval.py (for robustness, not for scores):
  * well-formed replies are cached (a re-run re-asks nothing already answered), each committed at once;
  * 429 / 5xx / timeouts / connection errors retry with exponential backoff (WISE: 10 tries, 5 s apart);
    401 / 403 / 404 stop the run (a wrong key, model or URL fails every image the same way);
  * a reply missing a score, or with a score outside 0-2, is "malformed": asked again up to
    `malformed_retries` times, counted, and if still malformed the image is left out of the averages
    and listed in summary.json (WISE's scripts instead refuse a whole file containing a 999);
  * `overall` is only reported when all six categories were judged; a subset gets `overall_partial`
    (the weights renormalised over the categories present), never mixed up with the real number.
"""

# ruff: noqa: W291  (the WISE judge prompt below is verbatim, trailing spaces included)
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from common import config as config_io
from common.call_cache import CallCache
from common.endpoint import (
    CallStats,
    EndpointConfig,
    FatalError,
    MissingAPIKey,
    Reply,
    SyncChatClient,
    png_part,
    resolve_api_key,
)
from eval.generator import ImageGenerator, generate_many, sample_seed
from eval.run_dir import (
    RECORDS_FILE,
    SUMMARY_FILE,
    clean_sample_dirs,
    cost_per_sample,
    record,
    save_sample,
    write_json_atomic,
    write_jsonl_atomic,
)
from inference.sharding import Shard

# prompt_id ranges of the six categories (WISE_legacy/data + wise_*.py) and their weights in the overall
CATEGORIES = {
    "culture": (1, 400),
    "time": (401, 567),
    "space": (568, 700),
    "biology": (701, 800),
    "physics": (801, 900),
    "chemistry": (901, 1000),
}
WEIGHTS = {"culture": 0.4, "time": 0.167, "space": 0.133, "biology": 0.1, "physics": 0.1, "chemistry": 0.1}
SCORE_KEYS = ("consistency", "realism", "aesthetic_quality")
MISSING = 999  # WISE's marker for "no score" in scores_results.jsonl
PROMPT_FIELDS = ("prompt_id", "Prompt", "Explanation", "Category", "Subcategory")


# ---- prompts ------------------------------------------------------------------------------------------
def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """All prompts of a WISE JSON file, or of every *.json in a directory, sorted by prompt_id."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no WISE *.json prompt files")
    prompts = []
    for f in files:
        for item in json.loads(f.read_text(encoding="utf-8")):
            missing = [k for k in PROMPT_FIELDS if k not in item]
            if missing:
                raise ValueError(f"{f}: prompt {item.get('prompt_id', '?')} lacks fields {missing}")
            prompts.append(item)
    return sorted(prompts, key=lambda p: p["prompt_id"])


def category_of(prompt_id: int) -> str:
    for name, (lo, hi) in CATEGORIES.items():
        if lo <= prompt_id <= hi:
            return name
    raise ValueError(f"prompt_id {prompt_id} is outside WISE's 1..1000")


def select_prompts(prompts: list[dict], subset: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Prompts of the categories in `subset` (all when None), the first `limit` of each category."""
    if subset:
        unknown = set(subset) - set(CATEGORIES)
        if unknown:
            raise ValueError(
                f"--subset: unknown WISE categories {sorted(unknown)}; expected some of {list(CATEGORIES)}"
            )
    kept, seen = [], dict.fromkeys(CATEGORIES, 0)
    for p in prompts:
        cat = category_of(p["prompt_id"])
        if subset and cat not in subset:
            continue
        seen[cat] += 1
        if limit is None or seen[cat] <= limit:
            kept.append(p)
    return kept


# ---- generation ---------------------------------------------------------------------------------------
def image_path(out: Path, prompt_id: int) -> Path:
    return out / "images" / f"{prompt_id}.png"


def generate_wise(
    generator: ImageGenerator,
    prompts: list[dict],
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    batch_size: int | None = None,
    shard: Shard | None = None,
) -> dict[str, int]:
    """One image per prompt (of this `shard`'s prompts), `batch_size` in flight (None: the generator's
    default); an image already on disk is kept (the PNG is written last, atomically)."""
    out = Path(out)
    shard = shard or Shard()
    if shard.count == 1:  # shards cannot tell another shard's writes in progress from debris: scoring cleans
        clean_sample_dirs(out)
    mine = shard.select(prompts)
    todo = [p for p in mine if not image_path(out, p["prompt_id"]).exists()]
    stats = dict(prompts=len(mine), generated=0, skipped=len(mine) - len(todo))
    jobs = [(p["Prompt"], sample_seed(seed, p["prompt_id"], 0)) for p in todo]
    for i, g in tqdm(generate_many(generator, jobs, batch_size), desc="wise", total=len(jobs), disable=not progress):
        pid = todo[i]["prompt_id"]
        save_sample(out, str(pid), g, jobs[i][1], {"prompt_id": pid})
        stats["generated"] += 1
    return stats


# ---- the judge --------------------------------------------------------------------------------------------
@dataclass
class JudgeConfig:
    """An OpenAI-compatible VLM judge. YAML: configs/eval/*.yaml; the API key is read from the environment."""

    base_url: str = "https://api.openai.com/v1"  # any OpenAI-compatible endpoint (vLLM, SGLang, a proxy)
    model: str = "gpt-4o-2024-05-13"  # the judge WISE's eval.sh used
    api_key_env: str = "OPENAI_API_KEY"  # NAME of the variable holding the key; the key is never stored or logged
    temperature: float = 0.0  # gpt_eval.py
    max_tokens: int = 2000  # gpt_eval.py
    timeout_s: float = 120.0  # per request
    max_retries: int = 8  # on 429 / 5xx / timeouts / connection errors
    backoff_s: float = 2.0  # first retry delay in seconds; doubles per retry, capped at 60 (Retry-After wins)
    malformed_retries: int = 1  # extra requests when a reply lacks a valid score
    max_workers: int = 8  # concurrent requests
    cache_dir: str = ""  # "" -> <out>/judge_cache; point runs at one shared folder to share replies

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JudgeConfig:
        """The YAML file's values, then `key=value` overrides (common.config)."""
        return config_io.load(cls, path, overrides)

    def api_key(self) -> str:
        """The key from $`api_key_env`; local endpoints (127.0.0.1, localhost) may go without one."""
        try:
            return resolve_api_key(self.api_key_env, self.base_url, optional_for_local=True)
        except MissingAPIKey as e:
            raise RuntimeError(f"judge: {e}") from e

    def endpoint(self) -> EndpointConfig:
        """These fields in the shared client's terms (WISE's YAML keeps its own names)."""
        return EndpointConfig(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            timeout_s=self.timeout_s,
            max_attempts=self.max_retries + 1,
            backoff_base_s=self.backoff_s,
            backoff_max_s=60.0,
            concurrency=max(1, self.max_workers),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )

    def public(self) -> dict[str, Any]:
        """What goes into config.json (the key itself is never part of the config)."""
        return asdict(self)


SYSTEM_TEXT = "You are a professional Vincennes image quality audit expert, please evaluate the image quality strictly according to the protocol."

# WISE gpt_eval.py `build_evaluation_messages`, verbatim (the two {…} fields are filled per prompt)
USER_TEXT = """Please evaluate strictly and return ONLY the three scores as requested.

# Text-to-Image Quality Evaluation Protocol

## System Instruction
You are an AI quality auditor for text-to-image generation. Apply these rules with ABSOLUTE RUTHLESSNESS. Only images meeting the HIGHEST standards should receive top scores.

**Input Parameters**  
- PROMPT: [User's original prompt to]  
- EXPLANATION: [Further explanation of the original prompt] 
---

## Scoring Criteria

**Consistency (0-2):**  How accurately and completely the image reflects the PROMPT.
* **0 (Rejected):**  Fails to capture key elements of the prompt, or contradicts the prompt.
* **1 (Conditional):** Partially captures the prompt. Some elements are present, but not all, or not accurately.  Noticeable deviations from the prompt's intent.
* **2 (Exemplary):**  Perfectly and completely aligns with the PROMPT.  Every single element and nuance of the prompt is flawlessly represented in the image. The image is an ideal, unambiguous visual realization of the given prompt.

**Realism (0-2):**  How realistically the image is rendered.
* **0 (Rejected):**  Physically implausible and clearly artificial. Breaks fundamental laws of physics or visual realism.
* **1 (Conditional):** Contains minor inconsistencies or unrealistic elements.  While somewhat believable, noticeable flaws detract from realism.
* **2 (Exemplary):**  Achieves photorealistic quality, indistinguishable from a real photograph.  Flawless adherence to physical laws, accurate material representation, and coherent spatial relationships. No visual cues betraying AI generation.

**Aesthetic Quality (0-2):**  The overall artistic appeal and visual quality of the image.
* **0 (Rejected):**  Poor aesthetic composition, visually unappealing, and lacks artistic merit.
* **1 (Conditional):**  Demonstrates basic visual appeal, acceptable composition, and color harmony, but lacks distinction or artistic flair.
* **2 (Exemplary):**  Possesses exceptional aesthetic quality, comparable to a masterpiece.  Strikingly beautiful, with perfect composition, a harmonious color palette, and a captivating artistic style. Demonstrates a high degree of artistic vision and execution.

---

## Output Format

**Do not include any other text, explanations, or labels.** You must return only three lines of text, each containing a metric and the corresponding score, for example:

**Example Output:**
Consistency: 2
Realism: 1
Aesthetic Quality: 0

---

**IMPORTANT Enforcement:**

Be EXTREMELY strict in your evaluation. A score of '2' should be exceedingly rare and reserved only for images that truly excel and meet the highest possible standards in each metric. If there is any doubt, downgrade the score.

For **Consistency**, a score of '2' requires complete and flawless adherence to every aspect of the prompt, leaving no room for misinterpretation or omission.

For **Realism**, a score of '2' means the image is virtually indistinguishable from a real photograph in terms of detail, lighting, physics, and material properties.

For **Aesthetic Quality**, a score of '2' demands exceptional artistic merit, not just pleasant visuals.

--- 
Here are the Prompt and EXPLANATION for this evaluation:
PROMPT: "{prompt}"
EXPLANATION: "{explanation}"
Please strictly adhere to the scoring criteria and follow the template format when providing your results."""


def build_messages(prompt: dict[str, Any], image_png: bytes) -> list[dict[str, Any]]:
    """The chat messages of gpt_eval.py: system line, then the protocol text and the image (PNG data URL)."""
    text = USER_TEXT.replace("{prompt}", prompt["Prompt"]).replace("{explanation}", prompt["Explanation"])
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_TEXT}]},
        {"role": "user", "content": [{"type": "text", "text": text}, png_part(image_png)]},
    ]


# gpt_eval.py `extract_scores` (its `[::]` is the ASCII and the full-width colon)
SCORE_PATTERN = re.compile(r"\*{0,2}(Consistency|Realism|Aesthetic Quality)\*{0,2}\s*[:：]?\s*(\d)", re.IGNORECASE)


def extract_scores(text: str) -> dict[str, float] | None:
    """The three scores of a judge reply (the last match of each wins, like gpt_eval.py); None when one
    is missing or outside 0-2 (a malformed reply)."""
    scores: dict[str, float] = {}
    for key, value in SCORE_PATTERN.findall(text or ""):
        scores[key.lower().replace(" ", "_")] = float(value)
    if set(scores) != set(SCORE_KEYS) or any(not 0 <= v <= 2 for v in scores.values()):
        return None
    return scores


def wiscore(consistency: float, realism: float, aesthetic_quality: float) -> float:
    """WISE's per-image score in [0, 1]."""
    return (0.7 * consistency + 0.2 * realism + 0.1 * aesthetic_quality) / 2


class Judge:
    """WISE's judge over the shared endpoint client (`common.endpoint`): cached replies, counted retries,
    malformed replies re-asked and counted. Thread-safe; `close()` when done."""

    NAME = "wise-judge"  # the cache's and the counters' name for these calls

    def __init__(self, config: JudgeConfig, cache_dir: str | Path):
        self.config = config
        self.cache = CallCache(config.cache_dir or cache_dir)
        self.calls = CallStats()
        self.client = SyncChatClient(config.endpoint(), self.cache, self.calls, self.NAME, api_key=config.api_key())

    @property
    def stats(self) -> dict[str, int]:
        """requests sent (retries included), cache hits, retries, malformed replies, failed images."""
        return {
            "requests": self.calls.total("requests"),
            "cache_hits": self.cache.stats().get(self.NAME, {}).get("hits", 0),
            "retries": self.calls.total("retries"),
            "malformed_replies": self.calls.total("malformed_replies"),
            "failed": self.calls.total("failed"),
        }

    def close(self) -> None:
        self.client.close()

    def judge(self, prompt: dict[str, Any], image_png: bytes) -> dict[str, Any]:
        """{"scores": {...} | None, "reply": last reply text, "error": str | None, "cached": bool}."""
        messages = build_messages(prompt, image_png)
        reply, error = Reply("", {}, "", cached=False), None
        for _ in range(1 + self.config.malformed_retries):
            try:  # only well-formed replies are cached; a malformed one is asked again
                reply = self.client.complete(messages, cache_when=lambda r: extract_scores(r.text) is not None)
            except FatalError:
                raise  # a wrong key / model / URL: every request would fail the same way
            except Exception as e:  # retries exhausted, or a per-request API error: report, don't crash
                error = f"{type(e).__name__}: {e}"
                self.calls.count("failed")
                break
            scores = extract_scores(reply.text)
            if scores is not None:
                return {"scores": scores, "reply": reply.text, "error": None, "cached": reply.cached}
            self.calls.count("malformed_replies")
        return {"scores": None, "reply": reply.text, "error": error or "malformed reply", "cached": False}


def judge_wise(out: str | Path, prompts: list[dict], config: JudgeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Judge every generated image of `prompts`; writes records.jsonl, scores_results.jsonl, summary.json."""
    out = Path(out)
    clean_sample_dirs(out)
    judge = Judge(config, out / "judge_cache")
    todo = [p for p in prompts if image_path(out, p["prompt_id"]).exists()]

    def one(p: dict) -> dict:
        return judge.judge(p, image_path(out, p["prompt_id"]).read_bytes())

    try:
        with ThreadPoolExecutor(max_workers=max(1, config.max_workers)) as pool:
            verdicts = list(tqdm(pool.map(one, todo), total=len(todo), desc="wise judge", disable=not progress))
    finally:
        judge.close()
    records, scores_rows = [], []
    for p, v in zip(todo, verdicts, strict=True):
        pid = p["prompt_id"]
        gen_path = out / "gen" / f"{pid}.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        s = v["scores"]
        extra = {k: (s[k] if s else None) for k in SCORE_KEYS}
        reasons = (
            [] if s and s["consistency"] > 0 else [f"judge: {v['error'] or 'consistency 0 (Rejected)'}", v["reply"]]
        )
        if gen.get("no_image"):
            reasons.insert(0, "the generator returned no image (judged on a black stand-in)")
        records.append(
            record(
                str(pid),
                category_of(pid),
                p["Prompt"],
                f"images/{pid}.png",
                correct=(s["consistency"] > 0) if s else None,
                score=wiscore(**s) if s else None,
                reasons=[r for r in reasons if r],
                seed=gen.get("seed"),
                trajectory=gen.get("trajectory"),
                cost=gen.get("cost"),
                subcategory=p["Subcategory"],
                explanation=p["Explanation"],
                **extra,
            )
        )
        scores_rows.append(
            {"prompt_id": pid, "Subcategory": p["Subcategory"], **{k: (s[k] if s else MISSING) for k in SCORE_KEYS}}
        )
    summary = summarize(records)
    summary.update(
        benchmark="wise",
        judge={"base_url": config.base_url, "model": config.model},
        judge_stats=dict(judge.stats),
        prompts=len(prompts),
        missing_images=len(prompts) - len(todo),
        cost_per_sample=cost_per_sample([r["cost"] for r in records if r["cost"]]),
    )
    write_jsonl_atomic(out / RECORDS_FILE, records)
    write_jsonl_atomic(out / "scores_results.jsonl", scores_rows)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-category mean WiScore with counts, and the weighted overall (see the module docstring)."""
    by_cat: dict[str, list[float]] = {}
    for r in records:
        if r["score"] is not None:
            by_cat.setdefault(r["category"], []).append(r["score"])
    categories = {c: {"score": sum(v) / len(v), "n": len(v)} for c in CATEGORIES if (v := by_cat.get(c))}
    present = sum(WEIGHTS[c] for c in categories)
    partial = sum(WEIGHTS[c] * categories[c]["score"] for c in categories) / present if categories else None
    return {
        "categories": categories,
        "overall": sum(WEIGHTS[c] * categories[c]["score"] for c in CATEGORIES)
        if len(categories) == len(CATEGORIES)
        else None,
        "overall_partial": partial,
        "judged": sum(c["n"] for c in categories.values()),
        "unscored": sorted((r["key"] for r in records if r["score"] is None), key=int),
    }
