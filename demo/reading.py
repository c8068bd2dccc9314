"""The demo report's reading of its numbers: a short paragraph of plain sentences generated from the ShapesEval
runs — the scores, what improved and what did not, and how far each number can be trusted at this n.

    from demo.reading import reading
    paragraphs = reading({"base-single": run, "finetuned-single": run, "finetuned-psir": run}, psir_records)

Spread: each score gets a 95% Wilson score interval from its number of images (`eval.intervals.wilson`); each
comparison of two models an exact McNemar test on the images both drew for the same prompt and seed
(`eval.intervals.mcnemar`), called significant at p < 0.05. Nothing is called an improvement that this test
cannot tell apart from chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eval.intervals import mcnemar, wilson
from eval.report import Run

NAMES = {  # eval run name (demo.pipeline.EVAL_RUNS) -> how a sentence calls it
    "base-single": "the base model",
    "finetuned-single": "the fine-tuned model in a single pass",
    "finetuned-psir": "the fine-tuned model with the PSIR loop",
}
SHORT = {"base-single": "the base", "finetuned-single": "the single pass", "finetuned-psir": "the PSIR loop"}
LABEL = {"base-single": "base", "finetuned-single": "single", "finetuned-psir": "PSIR"}
COMPARISONS = (("finetuned-single", "base-single"), ("finetuned-psir", "base-single"),
               ("finetuned-psir", "finetuned-single"))  # (new, old)  # fmt: skip
SIGNIFICANCE = 0.05
FULL_SHAPES_EVAL = 400  # ShapesEval's prompts (40 per category), for "at full size the interval would be"


@dataclass(frozen=True)
class Score:
    """Images judged correct out of images judged, with its 95% Wilson interval."""

    correct: int
    images: int

    @property
    def rate(self) -> float:
        return self.correct / self.images if self.images else 0.0

    def text(self) -> str:
        lo, hi = wilson(self.correct, self.images)
        return (f"{self.correct} of {self.images} images right ({100 * self.rate:.1f}%, 95% interval "
                f"{100 * lo:.0f}–{100 * hi:.0f}%)")  # fmt: skip


def score(run: Run, category: str | None = None) -> Score:
    recs = [r for r in run.records if category is None or r["category"] == category]
    return Score(sum(bool(r["correct"]) for r in recs), len(recs))


@dataclass(frozen=True)
class Comparison:
    """Two models on the same samples (prompt and seed): the discordant pairs and the exact test."""

    wins: int  # samples right with the new model only
    losses: int  # samples right with the old model only
    paired: int  # samples both models drew

    @property
    def p(self) -> float:
        return mcnemar(self.wins, self.losses)

    @property
    def points(self) -> float:
        return 100 * (self.wins - self.losses) / self.paired if self.paired else 0.0


def compare(new: Run, old: Run) -> Comparison:
    before = {r["key"]: bool(r["correct"]) for r in old.records}
    pairs = [(bool(r["correct"]), before[r["key"]]) for r in new.records if r["key"] in before]
    return Comparison(sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs), len(pairs))


def _pct(s: Score) -> str:
    return f"{s.correct}/{s.images}"


def _series(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def by_category(new: Run, old: Run) -> str:
    """Where `new` beat `old`, where it lost, and how many categories tied (counts, not rates: few prompts each)."""
    cats = list(dict.fromkeys(r["category"] for r in old.records + new.records))
    better, worse, same = [], [], 0
    for c in cats:
        a, b = score(new, c), score(old, c)
        if a.rate > b.rate:
            better.append(f"{c} ({_pct(a)} vs {_pct(b)})")
        elif a.rate < b.rate:
            worse.append(f"{c} ({_pct(a)} vs {_pct(b)})")
        else:
            same += 1
    parts = ([f"better in {_series(better)}"] if better else []) + ([f"worse in {_series(worse)}"] if worse else [])
    if same == len(cats):
        parts.append(f"the same in all {same} categories" if same > 1 else "the same in its one category")
    elif same:
        parts.append("the same in the other one" if same == 1 else f"the same in the other {same}")
    return _series(parts)


def stream_ends(run: Run) -> tuple[int, int]:
    """(streams stopped by a format failure, streams that drew no image) of a PSIR eval run."""
    failures = sum(bool(r.get("failure")) for r in run.records)
    no_image = sum(any(x.startswith("the generator returned no image") for x in r.get("reasons") or [])
                   for r in run.records)  # fmt: skip
    return failures, no_image


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def reading(runs: dict[str, Run], held_out: list[dict[str, Any]] | None = None) -> list[list[str]]:
    """The sentences, in two paragraphs (the scores, their spread and what differs beyond chance; then the
    details: by category, sub-checks, the PSIR streams), from the eval runs present (keys: `NAMES`) and the
    psir phase's records."""
    runs = {k: v for k, v in runs.items() if k in NAMES and v.records}
    if not runs:
        return [["No ShapesEval run has finished yet, so there is nothing to read."]]
    scores = {k: score(v) for k, v in runs.items()}
    first = next(iter(runs.values()))
    n = scores[next(iter(runs))].images
    prompts = len({r["key"].split("_")[0] for r in first.records})  # keys: <prompt index>_<sample>
    said = _series([f"{NAMES[k]} got {scores[k].text()}" for k in runs])
    head = [f"On {_plural(prompts, 'ShapesEval prompt')} ({_plural(n, 'image')} per model, each judged by exact "
            f"match to the prompt's scene), {said}.",
            f"The intervals are 95% Wilson score intervals over images; at n = {n} one image is "
            f"{100 / max(n, 1):.1f} points."]  # fmt: skip
    said, significant = [], []
    for new, old in COMPARISONS:
        if new in runs and old in runs:
            c = compare(runs[new], runs[old])
            said.append(f"{SHORT[new]} against {SHORT[old]} {c.points:+.1f} points ({c.wins} vs {c.losses}, "
                        f"p = {c.p:.2f})".replace("-", "−"))  # fmt: skip
            if c.p < SIGNIFICANCE and c.wins != c.losses:
                significant.append(f"{SHORT[new]} {'gains' if c.wins > c.losses else 'loses'} against {SHORT[old]}")
    if said:
        head.append("Paired on the same prompts and seeds (exact McNemar test on the images only one of the two got "
                    f"right, counted new vs old): {_series(said)}.")  # fmt: skip
        head.append(f"Only {_series(significant)} by more than chance at this n." if significant else
                    "None of these differences is larger than chance at this n.")  # fmt: skip
    if len(runs) > 1 and not significant:
        rate = sum(s.rate for s in scores.values()) / len(scores)
        full = FULL_SHAPES_EVAL * max(1, n // max(prompts, 1))
        lo, hi = wilson(round(rate * full), full)
        head.append(f"At this size the demo shows every stage running, not whether the method helps; all "
                    f"{FULL_SHAPES_EVAL} ShapesEval prompts (--eval-limit 40) would narrow each interval to about "
                    f"±{50 * (hi - lo):.0f} points at these accuracies.")  # fmt: skip
    detail = []
    ft = [k for k in ("finetuned-single", "finetuned-psir") if k in runs]
    if "base-single" in runs and ft:
        per = n // max(1, len({r["category"] for r in first.records}))
        parts = [f"{SHORT[k]} scores {by_category(runs[k], runs['base-single'])}" for k in ft]
        detail.append(f"By category against the base ({_plural(per, 'image')} each, so anecdotes rather than "
                      f"trends): {'; '.join(parts)}.")  # fmt: skip
    subs = _subscores(runs)
    if subs and len(runs) > 1:
        detail.append(f"The judge's sub-checks ({' → '.join(LABEL[k] for k in runs)}): {subs}.")
    if "finetuned-psir" in runs:
        failures, no_image = stream_ends(runs["finetuned-psir"])
        m = len(runs["finetuned-psir"].records)
        detail.append(f"{_cost(runs)}; {failures} of its {m} streams stopped on a format failure and {no_image} "
                      "drew no image.")  # fmt: skip
    if held_out:
        k = sum(bool(r["correct"]) for r in held_out)
        detail.append(f"On the {len(held_out)} held-out prompts further down, {k} final PSIR "
                      f"image{'s were' if k != 1 else ' was'} judged correct.")  # fmt: skip
    return [p for p in (head, detail) if p]


def _subscores(runs: dict[str, Run]) -> str:
    keys = list(dict.fromkeys(k for r in runs.values() for k in (r.summary.get("subscores") or {})))
    parts = []
    for key in keys:
        vals = [(r.summary.get("subscores") or {}).get(key) for r in runs.values()]
        parts.append(f"{key} " + " → ".join("—" if v is None else f"{100 * v['score']:.0f}%" for v in vals))
    return ", ".join(parts)


def _cost(runs: dict[str, Run]) -> str:
    def per(name: str) -> dict[str, float]:
        return runs[name].summary.get("cost_per_sample") or {} if name in runs else {}

    p, s = per("finetuned-psir"), per("finetuned-single") or per("base-single")
    text = (f"The PSIR loop drew {p.get('images', 0):.1f} images in {p.get('flow_steps', 0):.0f} Euler steps per prompt "
            f"and wrote {p.get('tokens', 0):.0f} text tokens")  # fmt: skip
    if s:
        text += (
            f" (a single pass: {_plural(round(s.get('images', 0)), 'image')}, {s.get('flow_steps', 0):.0f} Euler steps)"
        )
    return text
