"""What an eval run leaves on disk, and how it is written so that a killed run resumes cleanly.

Every run directory holds:

  config.json     what produced it (benchmark, ckpt, mode, n, seed, label, judge endpoint; never a key)
  records.jsonl   one line per scored image (see `record`), rewritten whole at the end of scoring
  summary.json    per-category scores with image counts, overall, cost per sample, benchmark extras
  ...             the benchmark's own layout (GenEval's numeric folders, WISE's images/, ...)

Resumability rests on one rule: a unit of work is complete iff its final file or folder exists, and
that file or folder only ever appears through `os.replace` / `os.rename` of a fully written temporary
sibling (`.tmp-*`). A SIGKILL can leave `.tmp-*` debris (removed by `clean_tmp`), never a half-written
final name.

Trajectories (when the generator returns one) are stored beside their image as `<stem>.traj/`:
`record.json` (the format-v1 row without image bytes) and `0.png`, `1.png`, ... (see docs/format.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from bagel_ft.trajectory import Trajectory
from common.atomic import (  # noqa: F401  (eval's run folders are written through these; callers import them here)
    TMP_PREFIX,
    clean_tmp,
    make_tmp_dir,
    replacing_directory,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from common.errors import UserError
from common.images import image_to_png

CONFIG_FILE = "config.json"
RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
# config fields that must agree for a run directory to be resumed (n and limit may grow)
IDENTITY_FIELDS = ("benchmark", "ckpt", "mode", "seed", "inference")


class RunDirError(UserError, RuntimeError):
    """A run directory cannot be used as asked (e.g. it was produced by a different config)."""


def save_png_atomic(path: str | Path, image: Image.Image) -> None:
    write_bytes_atomic(path, image_to_png(image))


def clean_sample_dirs(out: str | Path) -> None:
    """`clean_tmp` of the per-sample folders images/, gen/, trajectories/ (ShapesEval's and WISE's layout)."""
    for d in ("images", "gen", "trajectories"):
        clean_tmp(Path(out) / d)


# ---- jsonl -------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl_atomic(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


# ---- run config --------------------------------------------------------------------------------------
def prepare_run_dir(out: str | Path, config: dict[str, Any]) -> Path:
    """Create (or reopen for resuming) a run directory and record `config` in it.

    Reopening a directory written with a different benchmark/ckpt/mode/seed/inference settings raises
    `RunDirError`: its finished work would silently be mixed into the new run's numbers. A directory that
    holds no finished work (a command that failed before its first result, e.g. on a mistyped --ckpt) is
    simply taken over by the new config.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILE
    if path.exists() and holds_work(out):
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), config.get(k)) for k in IDENTITY_FIELDS if old.get(k) != config.get(k)}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise RunDirError(f"{out} holds a run with a different config ({detail}); use a new --out")
    write_json_atomic(path, config)
    return out


def holds_work(out: Path) -> bool:
    """Whether `out` holds any finished file besides its config (`.tmp-*` debris does not count)."""
    for p in out.rglob("*"):
        if p.is_file() and p != out / CONFIG_FILE and not any(part.startswith(TMP_PREFIX) for part in p.parts):
            return True
    return False


def read_config(run: str | Path) -> dict[str, Any]:
    path = Path(run) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def run_label(config: dict[str, Any], run: str | Path) -> str:
    """The row label of a run in reports: its --label, else `<ckpt name>/<mode>`, else the folder name."""
    if config.get("label"):
        return str(config["label"])
    if config.get("ckpt"):
        return f"{Path(str(config['ckpt']).rstrip('/')).name}/{config.get('mode', '?')}"
    return Path(run).name


# ---- trajectories ------------------------------------------------------------------------------------
def save_trajectory(path: str | Path, traj: Trajectory) -> None:
    """Write `traj` as the folder `path` (record.json + one PNG per image), atomically."""
    row = traj.to_row()
    images = row.pop("images")
    row["images"] = [f"{i}.png" for i in range(len(images))]
    with replacing_directory(path) as tmp:
        for name, data in zip(row["images"], images, strict=True):
            (tmp / name).write_bytes(data)
        (tmp / "record.json").write_text(json.dumps(row, indent=1, ensure_ascii=False))


def load_trajectory(path: str | Path) -> Trajectory:
    path = Path(path)
    row = json.loads((path / "record.json").read_text())
    row["images"] = [(path / name).read_bytes() for name in row["images"]]
    return Trajectory.from_row(row)


def save_sample(out: Path, stem: str, generation: Any, seed: int, ids: dict[str, Any]) -> None:
    """One generated sample in the images/ gen/ trajectories/ layout (ShapesEval, WISE): its trajectory folder
    (when there is one), gen/<stem>.json (`ids`, seed, cost, trajectory path, no_image, the format failure that
    ended a PSIR stream), then images/<stem>.png, written last: the PNG marks the sample as done."""
    traj = None
    if generation.trajectory is not None:
        traj = f"trajectories/{stem}.traj"
        save_trajectory(out / traj, generation.trajectory)
    write_json_atomic(
        out / "gen" / f"{stem}.json",
        {
            **ids,
            "seed": seed,
            "cost": generation.cost,
            "trajectory": traj,
            "no_image": generation.no_image,
            "failure": generation.failure,
        },
    )
    save_png_atomic(out / "images" / f"{stem}.png", generation.image)


# ---- a scored image ----------------------------------------------------------------------------------
def record(
    key: str,
    category: str,
    prompt: str,
    image: str,
    *,
    correct: bool | None = None,
    score: float | None = None,
    reasons: list[str] | None = None,
    seed: int | None = None,
    trajectory: str | None = None,
    cost: dict[str, float] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One line of records.jsonl. `image` and `trajectory` are paths relative to the run directory;
    `correct` is the judge's verdict (None: not judged), `score` the benchmark's per-image score."""
    return dict(
        key=key,
        category=category,
        prompt=prompt,
        image=image,
        correct=correct,
        score=score,
        reasons=list(reasons or []),
        seed=seed,
        trajectory=trajectory,
        cost=dict(cost or {}),
        **extra,
    )


def cost_per_sample(costs: list[dict[str, float]]) -> dict[str, float] | None:
    """Mean of each cost counter over the samples that recorded it (None when none did)."""
    keys = sorted({k for c in costs for k in c})
    if not keys:
        return None
    return {k: sum(c[k] for c in costs if k in c) / sum(1 for c in costs if k in c) for k in keys}
