"""A trajectory as one self-contained HTML page: the prompt, then a strip of cards in stream order —
plan / inspect / refine text and each draft image — plus budgets, costs and any recorded format failure, as a
sentence (`inference.psir.describe_failure`). Strips wrap: every draft is visible without sideways scrolling.

Images are inlined as base64 PNG by default (the file opens anywhere); pass `image_paths` (relative to
the HTML file) to reference the saved PNGs instead.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable

from PIL import Image

from bagel_ft.trajectory import Trajectory
from common.images import image_to_png
from inference.psir import describe_failure

CARD_STYLE = """
.strip { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; padding-bottom: 1em; }
.card { flex: 0 0 auto; border: 1px solid #ccc; border-radius: 6px; padding: 8px; max-width: 260px; background: #fff; }
.card .role { font-size: 0.75em; text-transform: uppercase; color: #666; margin-bottom: 4px; }
.card pre { white-space: pre-wrap; word-break: break-word; font-size: 0.85em; margin: 0; }
.card img { max-width: 240px; image-rendering: pixelated; display: block; }
.card.plan { background: #e8f0fe; } .card.inspect { background: #fef7e0; } .card.refine { background: #fce8e6; }
.card.caption { background: #eeeeee; } .card.failure { background: #fdecea; border-color: #e8a09a; }
.card.failure p { margin: 0; font-size: 0.85em; }
"""

STYLE = (
    """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; } .prompt { font-size: 1.1em; margin-bottom: 1em; }
.card img { width: 240px; }
.meta { font-size: 0.8em; color: #444; }
"""
    + CARD_STYLE
)


def data_url(image: Image.Image, max_side: int | None = None) -> str:
    """An inline PNG data URL of `image`, scaled (nearest) so its longest side is `max_side` px if given."""
    image = image.convert("RGB")
    if max_side is not None:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    return "data:image/png;base64," + base64.b64encode(image_to_png(image)).decode("ascii")


def trajectory_cards(traj: Trajectory | None, image_src: Callable[[int], str], extra_cards: str = "") -> str:
    """The strip: one card per turn in stream order (role + escaped text, or the image; given images are
    marked), then `extra_cards` (HTML). `image_src(index)` gives each image's src (a data URL or a relative
    path). Style: CARD_STYLE."""
    cards, draft = [], 0
    for turn in traj.turns if traj is not None else []:
        if turn.is_image:
            draft += 1
            label = f"draft {draft}" + ("" if turn.loss else " (given)")
            body = f'<img src="{image_src(turn.image)}" alt="{label}">'
        else:
            label, body = turn.role, f"<pre>{html.escape(turn.text)}</pre>"
        cards.append(f'<div class="card {turn.role}"><div class="role">{label}</div>{body}</div>')
    return f'<div class="strip">{"".join(cards)}{extra_cards}</div>'


def format_failure_card(failure: dict | None) -> str:
    """The card that ends a strip whose stream broke the format: the failure as a sentence (`describe_failure`);
    "" without a failure."""
    if not failure:
        return ""
    return (f'<div class="card failure"><div class="role">format failure</div>'
            f"<p>{html.escape(describe_failure(failure))}</p></div>")  # fmt: skip


PAGE_TITLES = {"single": "Single-pass image", "psir": "PSIR trajectory", "scaled": "PSIR trajectory (scaled search)"}


def page_title(traj: Trajectory) -> str:
    """The heading by how the stream was drawn (meta["mode"] of inference.api), e.g. no "PSIR" for a single pass."""
    return PAGE_TITLES.get(traj.meta.get("mode"), "Trajectory")


def render_html(traj: Trajectory, image_paths: list[str] | None = None, title: str = "") -> str:
    """The page as a string (see the module docstring)."""

    def image_src(index: int) -> str:
        return html.escape(image_paths[index]) if image_paths is not None else data_url(traj.images[index])

    meta = dict(traj.meta)
    failure = meta.pop("failure", None)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or traj.prompt[:60])}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title or page_title(traj))} <span class='meta'>{traj.id}</span></h1>",
        f"<div class='prompt'><b>Prompt:</b> {html.escape(traj.prompt)}</div>",
        trajectory_cards(traj, image_src, format_failure_card(failure)),
    ]
    parts.append(
        f"<details><summary>meta</summary><pre class='meta'>{html.escape(json.dumps(meta, indent=1, default=str))}</pre></details>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
