"""Where training metrics go: `metrics.jsonl` (every step, rank 0), the console, and optionally TensorBoard / W&B.

Also the FLOP count behind MFU: per token, 6 x (parameters a token passes through in the LLM) for the matmuls
(forward + backward) plus 12 x layers x hidden x (mean attended keys) for attention scores and values. MoT routes
each token through ONE expert, so the active LLM parameters are the und (or gen) half of the layer weights;
the lm_head is counted only for CE positions and the ViT is ignored (small).
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bagel_ft.batch import PackedBatch
from bagel_ft.config import BagelConfig

# dense bf16 peak TFLOP/s by device name fragment (NVIDIA datasheets, SXM parts)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def peak_tflops(device: torch.device, override: float = 0.0) -> float:
    if override > 0:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def llm_expert_params_per_layer(cfg: BagelConfig) -> int:
    """Matmul parameters one token passes through in one decoder layer (one expert)."""
    llm = cfg.llm
    h, kv = llm.hidden_size, llm.num_key_value_heads * llm.head_dim
    return h * h * 2 + h * kv * 2 + 3 * h * llm.intermediate_size  # q, o, k, v, gate/up/down


def training_flops(batch: PackedBatch, cfg: BagelConfig) -> float:
    """Model FLOPs of one forward + backward over a packed batch (module doc)."""
    llm = cfg.llm
    tokens = batch.sequence_length
    dense = 6 * tokens * llm.num_hidden_layers * llm_expert_params_per_layer(cfg)
    ce = batch.ce_loss_indexes.numel() if batch.ce_loss_indexes is not None else 0
    head = 6 * ce * llm.hidden_size * llm.vocab_size
    # attention: each query attends to at most its sample's tokens (block-diagonal); use the full-sample bound
    attended = sum(n * n for n in batch.sample_lens)
    attn = 12 * llm.num_hidden_layers * llm.hidden_size * attended
    return float(dense + head + attn)


WANDB_ID_FILE = "wandb_run_id"  # in the run dir: the W&B run a resumed run continues


class MetricsLogger:
    """metrics.jsonl and, when configured, TensorBoard (run_dir/tb) and W&B get every step; the console the
    steps the trainer asks for. Rank 0 only (`enabled`).

    `start_step` is the step a resumed run starts after (0: a fresh run). A resumed run logs again the steps
    a killed process logged after its checkpoint: `read_metrics` keeps the last line of each, TensorBoard
    hides the killed process's events from `start_step + 1` on (`purge_step`), and W&B continues the same
    run (its id is kept in `run_dir/wandb_run_id`; a fresh start gets a new one) and keeps the values it
    already holds for those steps (W&B steps only grow).
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = False,
        wandb_project: str = "",
        config: dict | None = None,
        start_step: int = 0,
    ):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.tb = self.wandb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "train.tensorboard=true needs the tensorboard package: pip install -e '.[logging]'"
                ) from e
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if enabled and wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "train.wandb_project is set but wandb is not installed: pip install -e '.[logging]'"
                ) from e
            self.wandb = wandb.init(
                project=wandb_project,
                dir=str(run_dir),
                config=config,
                id=wandb_run_id(run_dir, resuming=start_step > 0),
                resume="allow",
            )
        self._t0 = time.time()

    def log(self, step: int, metrics: dict[str, Any], console: bool) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if console:
            parts = [f"step {step}"] + [f"{k} {_fmt(v)}" for k, v in numbers.items()]
            print(" | ".join(parts), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(run_dir: Path, resuming: bool) -> str:
    """The W&B run id of a run dir: the stored one when resuming, else a new one (stored). Not the dir's name:
    runs/a/exp and runs/b/exp would share it, and a fresh start would append to an old run's history."""
    path = run_dir / WANDB_ID_FILE
    run_id = path.read_text().strip() if resuming and path.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)
        path.write_text(run_id + "\n")
    return run_id


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def read_metrics(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: metrics}; a step logged twice (re-run after a resume) keeps its last entry."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed process
                continue
            out[row["step"]] = row
    return out
