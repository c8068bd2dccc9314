"""Could the base judge the PSIR arm's drafts? A probe of the reproduction's diagnosis (docs/results.md).

The PSIR arms' inspect turns say "consistent" to nearly every draft, while the base judges text / picture pairs in
its own verdict form ("the picture shows ...; consistent / inconsistent: ...") at 81% balanced on held-out scenes.
This asks the *base* the verdict question (`eval.skills.ask`, the skills evaluation's VERIFY prompt) about every
(plan <des>, the draft before the inspect turn) pair of a PSIR eval run, and compares three judges against the
exact shapes judge on the same pairs: the base, the stream's own inspect turn, and "always consistent".

    python -m demo.inspect_probe --run runs/repro-s0/eval/psir-s0-psir --limit 300
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from eval.run_dir import load_trajectory, read_jsonl
from scene_graphs.describe import describe
from scene_graphs.shapes import check
from scene_graphs.shapes.tasks import CONSISTENT, VERIFY, parse_verdict_answer


def inspect_pairs(run: Path, limit: int) -> list[dict[str, Any]]:
    """The first `limit` inspect turns of a PSIR eval run whose plan <des> parses: {text (the <des> as the base's
    records word it), image (the draft before the turn), truth (the exact judge), stream (the turn said
    consistent)}."""
    from demo.reproduce import inspected_drafts

    pairs: list[dict[str, Any]] = []
    for rec in read_jsonl(run / "records.jsonl"):
        if not rec.get("trajectory"):
            continue
        for graph, image, says in inspected_drafts(load_trajectory(run / rec["trajectory"])):
            if graph is None or image is None:
                continue
            pairs.append({"text": describe(graph), "image": image, "truth": bool(check(image, graph).consistent),
                          "stream": says})  # fmt: skip
            if len(pairs) >= limit:
                return pairs
    return pairs


def balanced(said: list[bool], truth: list[bool]) -> float:
    """Mean of the accuracies on the truly consistent and the truly inconsistent pairs (0.5 = chance)."""
    accs = []
    for side in (True, False):
        idx = [i for i, t in enumerate(truth) if t == side]
        if idx:
            accs.append(sum(said[i] == side for i in idx) / len(idx))
    return sum(accs) / len(accs) if accs else float("nan")


def probe(base: str | Path, run: str | Path, limit: int = 300) -> dict[str, Any]:
    from eval.skills import SkillsConfig, ask
    from inference.engine import Engine

    pairs = inspect_pairs(Path(run), limit)
    engine, config = Engine.from_pretrained(str(base)), SkillsConfig()
    answers = [ask(engine, config, p["text"], p["image"], VERIFY) for p in pairs]
    base_said = [parse_verdict_answer(a) == CONSISTENT for a in answers]
    truth = [p["truth"] for p in pairs]
    judges = {"base (verdict form)": base_said, "stream's own inspect": [p["stream"] for p in pairs],
              "always consistent": [True] * len(pairs)}  # fmt: skip
    return {
        "pairs": len(pairs),
        "truly_consistent": sum(truth) / max(len(truth), 1),
        "unparsed_base_answers": sum(parse_verdict_answer(a) is None for a in answers),
        "judges": {
            name: {
                "balanced": balanced(said, truth),
                "accuracy": sum(s == t for s, t in zip(said, truth, strict=True)) / max(len(truth), 1),
            }
            for name, said in judges.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.inspect_probe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--run", required=True, help="a PSIR-mode ShapesEval run folder (records.jsonl, trajectories/)")
    ap.add_argument("--base", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-base"))
    ap.add_argument("--limit", type=int, default=300, help="inspect turns probed (%(default)s)")
    a = ap.parse_args(argv)
    r = probe(a.base, a.run, a.limit)
    print(f"{r['pairs']} inspect turns, {100 * r['truly_consistent']:.0f}% truly consistent, "
          f"{r['unparsed_base_answers']} base answers without a verdict")  # fmt: skip
    print("| judge | balanced accuracy | accuracy |\n|---|---|---|")
    for name, v in r["judges"].items():
        print(f"| {name} | {100 * v['balanced']:.1f}% | {100 * v['accuracy']:.1f}% |")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
