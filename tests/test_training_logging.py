"""TensorBoard and W&B logging of a tiny CPU training run (`pip install -e ".[logging]"`): every scalar of
metrics.jsonl (losses, lr, tokens/s, ...) reads back, step by step, from TensorBoard's event files and from
W&B's offline run file, also across a resume that logs some steps a second time. W&B runs offline with
its base URL pointed at a local listener, which must receive nothing."""

from __future__ import annotations

import json
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from training import checkpoint as ckpt
from training.config import load_config
from training.metrics import WANDB_ID_FILE, read_metrics
from training.synthetic import write_table
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"
FAST = ["data.prefetch=0", "optim.warmup_steps=2", "train.log_every=1000", "train.export_ema=false"]
NEEDS = "the logging extra is not installed: pip install -e '.[logging]'"
LOGGED = {"loss", "ce", "mse", "lr", "tokens_per_s", "tokens", "grad_norm"}  # at least these, every step


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data") / "synthetic", records=8, size=(16, 16), rows_per_file=8)


def train(data, run_dir: Path, steps: int, *extra: str) -> None:
    """`steps` tiny steps in `run_dir`, a checkpoint every 2 (and at the last step)."""
    sets = [f"data.sources=[{{path: {data}}}]", f"run.dir={run_dir}", f"train.steps={steps}", "train.save_every=2"]
    Trainer(load_config(TINY, [*sets, *FAST, *extra])).setup().train()


def train_killed_and_resumed(data, run_dir: Path, *extra: str) -> dict[int, dict]:
    """3 steps (checkpoints at 2 and 3), then a resume from step 2 to step 4, as after a kill at step 3:
    step 3 is logged twice. Returns read_metrics (the last logging of each step)."""
    train(data, run_dir, 3, *extra)
    train(data, run_dir, 4, f"run.resume={run_dir / 'checkpoints' / ckpt.step_dir_name(2)}", *extra)
    lines = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 3, 4]
    metrics = read_metrics(run_dir)
    assert LOGGED <= set(metrics[1])
    return metrics


def numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def test_tensorboard_scalars_equal_metrics_jsonl(data, tmp_path):
    pytest.importorskip("tensorboard", reason=NEEDS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics = train_killed_and_resumed(data, tmp_path, "train.tensorboard=true")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 2  # one per process
    assert set(events.Tags()["scalars"]) == set(numbers(metrics[1]))
    for tag in events.Tags()["scalars"]:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        # the killed process's step 3 is purged: one value per step, the resumed run's (float32 in TensorBoard)
        assert logged == [(s, float(np.float32(metrics[s][tag]))) for s in (1, 2, 3, 4)], tag


class Listener:
    """Records every HTTP request that reaches 127.0.0.1:port (W&B's base URL in the test)."""

    def __init__(self):
        self.requests: list[str] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _record(self):
                listener.requests.append(f"{self.command} {self.path}")
                self.send_response(500)
                self.end_headers()

            do_GET = do_POST = do_PUT = _record

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wandb_history(run_file: Path) -> dict[int, dict]:
    """{step: logged values} of a W&B run file (`run-ID.wandb`): a LevelDB-style log of protobuf `Record`s
    after a 7-byte header (":W&B", magic 0xBEE1, version 0); records may span 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{run_file}: not a W&B run file"
    block, pos, pending, history = 32768, 7, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # preallocated, unwritten space
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{run_file}: bad checksum at byte {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start a record, MIDDLE / LAST add
        if kind in (1, 4):  # FULL / LAST end it
            record = wandb_internal_pb2.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = {
                    item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_wandb_offline_run_holds_the_same_scalars_and_sends_nothing(data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason=NEEDS)
    home = tmp_path / "wandb-home"
    for var in ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(home))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no stdout/stderr wrapping inside pytest's capture
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    run_dir = tmp_path / "run"
    try:
        with Listener() as listener:
            monkeypatch.setenv("WANDB_BASE_URL", listener.url)
            metrics = train_killed_and_resumed(data, run_dir, "train.wandb_project=bagel-ft-test")
    finally:
        wandb.teardown()  # stop W&B's service process
    assert listener.requests == []

    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    run_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in run_files] == [f"run-{run_id}.wandb"] * 2  # the resumed process continues the run
    first, resumed = (wandb_history(f) for f in run_files)
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [3, 4]
    for step, values in [*first.items(), *resumed.items()]:
        assert set(values) == set(numbers(metrics[step])), step
    # W&B values are the logged doubles; steps 1, 2 from the first process, 3 and 4 the resumed one's
    assert {**first, **resumed} == {s: numbers(metrics[s]) for s in (1, 2, 3, 4)}


def test_a_fresh_run_gets_a_new_wandb_id_and_a_resumed_one_keeps_it(tmp_path):
    from training.metrics import wandb_run_id

    a, b = tmp_path / "a" / "exp", tmp_path / "b" / "exp"
    for d in (a, b):
        d.mkdir(parents=True)
    first = wandb_run_id(a, resuming=False)
    assert wandb_run_id(a, resuming=True) == first  # the resume continues the W&B run
    assert wandb_run_id(b, resuming=False) != first  # same dir name, another run
    assert wandb_run_id(a, resuming=False) != first  # a fresh start in the same dir: a new run
