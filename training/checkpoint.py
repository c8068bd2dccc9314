"""Training checkpoints: sharded, atomic, keep-last-N, auto-resume (their export: training.export).

Layout of `run.dir/checkpoints/step_00001000/`:
  .metadata, __*_*.distcp      torch.distributed.checkpoint: model, optimizer and EMA; every rank writes its own
                               shards (FSDP2 DTensors) and nothing is gathered (DeepSpeed: `ds/` of engine files)
  extra_rank{r}.pt             per rank: scheduler, RNG states (python, numpy, torch, cuda), data-stream states,
                               counters
  meta.json                    step, world size, grad_accum, sharding, the step's metrics
  COMPLETE                     written last

Atomicity: everything is written into `step_N.tmp/`; rank 0 writes COMPLETE there, fsyncs and renames the
directory to `step_N/`. A checkpoint counts only if its name has no `.tmp` and it holds COMPLETE, so a crash
at any point of a save leaves the previous checkpoint as the latest; stale `.tmp` directories are removed by
the next save. After a successful save only the newest `keep_last` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from training.parallelize import DistEnv, all_reduce_, barrier

STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


# ---- RNG ------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- save / load -------------------------------------------------------------------------------------------


def _tensor_state(model: nn.Module, optimizer, ema) -> dict[str, Any]:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "ema": ema.state_dict() if ema is not None else {}}


def _write_marker(path: Path, meta: dict) -> None:
    (path / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    with open(path / COMPLETE, "w") as f:
        f.write(f"{meta['step']}\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer,
    ema,
    extra: dict[str, Any],
    meta: dict[str, Any],
    env: DistEnv,
    keep_last: int,
    engine=None,
) -> Path:
    """Write checkpoint `step` atomically (module doc). `extra` is this rank's; `meta` rank 0's."""
    root = Path(root)
    final, tmp = root / step_dir_name(step), root / (step_dir_name(step) + ".tmp")
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(env)
    _check_shared(tmp, env)
    if engine is not None:  # DeepSpeed: its own sharded files (model + optimizer partitions per rank)
        engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
        torch.save(ema.state_dict() if ema is not None else {}, tmp / f"ema_rank{env.rank}.pt")
    else:
        dcp.save(_tensor_state(model, optimizer, ema), checkpoint_id=str(tmp), no_dist=not env.distributed)
    torch.save({**extra, "rng": rng_state()}, tmp / f"extra_rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        _fsync_dir(tmp)
        _write_marker(tmp, {**meta, "step": step, "world_size": env.world_size})
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def _check_shared(path: Path, env: DistEnv) -> None:
    """Every rank must see the directory rank 0 made: on several nodes, run.dir must be on a shared file system
    (else each node would keep its own ranks' shards and no node a complete checkpoint)."""
    if not env.distributed:
        return
    seen = torch.tensor([1.0 if path.is_dir() else 0.0], device=env.device)
    all_reduce_(seen, env, op=dist.ReduceOp.MIN)
    if seen.item() == 0:
        raise RuntimeError(
            f"{path}: created by rank 0 but not visible on every rank; with several nodes, run.dir must be on a "
            "file system all nodes share (NFS, Lustre, ...)"
        )


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, ema, env: DistEnv, engine=None) -> dict[str, Any]:
    """Restore model, optimizer and EMA in place; returns this rank's `extra` (RNG states are set here)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta["world_size"] != env.world_size:
        raise RuntimeError(
            f"{path}: written by {meta['world_size']} processes, this run has {env.world_size}; "
            "resume with the same number of processes (the data streams depend on it)"
        )
    if engine is not None:
        engine.load_checkpoint(str(path / "ds"), tag="state")
        if ema is not None:
            for name, t in torch.load(path / f"ema_rank{env.rank}.pt", weights_only=False).items():
                ema.shadow[name].copy_(t)
    else:
        state = _tensor_state(model, optimizer, ema)
        dcp.load(state, checkpoint_id=str(path), no_dist=not env.distributed)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"extra_rank{env.rank}.pt", weights_only=False)
    set_rng_state(extra["rng"])
    return extra
