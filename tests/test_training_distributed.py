"""Multi-process CPU training (gloo): at equal global batch, 2 processes x 1 pack match 1 process x 2 packs,
also as 2 "nodes" x 1 process (two torchrun launchers on 127.0.0.1, static and c10d rendezvous) that load a
pretrained checkpoint sharded (each rank reads only its FSDP shards) and export it at the end.

DeepSpeed (ZeRO-2 / ZeRO-3; skipped without deepspeed) runs on packs that differ per rank (CFG dropout of ViT
and clean VAE images, so one rank's pack may lack ViT tokens while the other's has them): training.uniform's
dummy sample keeps the ranks' collectives in step.

Slow (torchrun launches): `pytest -m slow tests/test_training_distributed.py`.
"""

import importlib.util
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel
from training import checkpoint as ckpt
from training.config import load_config
from training.export import MANIFEST
from training.metrics import read_metrics
from training.parallelize import DistEnv
from training.synthetic import write_table
from training.trainer import Trainer, build_streams, build_tokenizer, model_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"
STEPS = 4
MIXED = ["data.vit_cond_dropout_prob=0.5", "data.vae_cond_dropout_prob=0.5"]  # packs differ per rank
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data") / "synthetic", records=24, size=(16, 16), rows_per_file=12)


def common(data, run_dir):
    return [
        f"data.sources=[{{path: {data}}}]",
        f"run.dir={run_dir}",
        f"train.steps={STEPS}",
        "train.save_every=2",
        "data.prefetch=0",
        "optim.warmup_steps=1",
        "train.export_ema=false",
    ]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    Trainer(load_config(TINY, common(data, run) + ["train.grad_accum=2"])).setup().train()
    return read_metrics(run)


@pytest.fixture(scope="module")
def single_mixed(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("single_mixed")
    Trainer(load_config(TINY, common(data, run) + MIXED + ["train.grad_accum=2"])).setup().train()
    return read_metrics(run)


def pack_modules(data, rank: int) -> list[tuple[bool, bool]]:
    """(has ViT tokens, has a noisy VAE target) of rank `rank`'s packs in a 2-process MIXED run."""
    cfg = load_config(TINY, common(data, "unused") + MIXED)
    streams = build_streams(cfg, model_config(cfg), build_tokenizer(cfg), DistEnv(rank, 2, 0, None))
    packs = [streams[0].stream.next_pack().batch for _ in range(STEPS)]
    return [(b.has_vit, b.mse_loss_indexes is not None and b.mse_loss_indexes.numel() > 0) for b in packs]


def torchrun(data, run_dir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.cli",
        str(TINY),
        *common(data, run_dir),
        *extra,
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # a collective mismatch hangs
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return read_metrics(run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(data, run_dir, rendezvous: str, *extra):
    """2 "nodes" x 1 process: one torchrun launcher per node, as on a cluster, both on 127.0.0.1."""
    port = free_port()
    if rendezvous == "static":  # node ranks given, rank 0's host is the master
        launch = [["--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port)] for n in (0, 1)]
    else:  # c10d: the nodes find each other through the rendezvous endpoint; ranks are assigned
        launch = [["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]] * 2
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", *node]
            + ["-m", "training.cli", str(TINY), *common(data, run_dir), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in launch
    ]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-5000:]
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The `single` run's initial weights (model.init=random, run.seed 0) saved as a checkpoint directory."""
    path = tmp_path_factory.mktemp("pretrained") / "tiny"
    torch.manual_seed(0)
    cfg = BagelConfig.preset("tiny")
    Bagel(cfg).attach_vae(AutoEncoder(cfg.vae)).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BagelByteTokenizer"}))
    return path


def assert_match(single, multi, rel=1e-4, steps=range(1, STEPS + 1)):
    assert sorted(single) == sorted(multi) == list(steps)
    for step in single:
        a, b = single[step], multi[step]
        assert a["tokens"] == b["tokens"] and a["ce_tokens"] == b["ce_tokens"], step  # same global batch
        for key in ("loss", "ce", "mse", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (step, key, a[key], b[key])


@pytest.mark.slow
def test_fsdp_two_processes_match_single_process(data, single, tmp_path):
    multi = torchrun(data, tmp_path, "train.sharding=fsdp")
    print({s: (round(single[s]["loss"], 6), round(multi[s]["loss"], 6)) for s in single})
    assert_match(single, multi)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    shards = sorted(p.name for p in last.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert (last / "extra_rank1.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_load_sharded_and_match_single_process(data, single, pretrained, rendezvous, tmp_path):
    """The same config on 1 or 2 nodes: train.global_batch=2 is 2 packs per step either way (grad_accum 2 on one
    process, 1 per rank on two), so the losses match the single process's. Each rank loads only its FSDP shards
    of the pretrained checkpoint (= the single run's random init), and rank 0 exports the EMA at the end."""
    pretrained_run = ["model.init=pretrained", f"model.path={pretrained}", "model.tokenizer=", "train.global_batch=2"]
    multi = torchrun_two_nodes(
        data, tmp_path, rendezvous, "train.sharding=fsdp", "train.export_ema=true", *pretrained_run
    )
    print({s: (round(single[s]["loss"], 6), round(multi[s]["loss"], 6)) for s in single})
    assert_match(single, multi)
    export = tmp_path / "export"
    model = Bagel.from_pretrained(export)
    manifest = json.loads((export / MANIFEST).read_text())
    assert manifest["steps"] == STEPS and manifest["world_size"] == 2
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    import torch.distributed.checkpoint as dcp

    keys = json.loads((last / "meta.json").read_text())["ema_keys"]
    ema = {k: torch.empty_like(model.state_dict()[k]) for k in keys}
    dcp.load({"ema": ema}, checkpoint_id=str(last), no_dist=True)  # assembled from both ranks' shards
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


@pytest.mark.slow
def test_replicated_two_processes_match_single_process(data, single, tmp_path):
    assert_match(single, torchrun(data, tmp_path, "train.sharding=none"))


def test_mixed_packs_differ_between_ranks(data):
    """The DeepSpeed tests below are only meaningful if some step's packs use different modules per rank."""
    assert pack_modules(data, 0) != pack_modules(data, 1)


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero2_two_processes_match_single_process(data, single_mixed, pretrained, tmp_path):
    """From the pretrained directory (= single_mixed's random init): every rank loads it whole, DeepSpeed shards."""
    from_dir = ["model.init=pretrained", f"model.path={pretrained}", "model.tokenizer="]
    assert_match(single_mixed, torchrun(data, tmp_path, "train.sharding=zero2", *MIXED, *from_dir))


@pytest.mark.slow
@needs_deepspeed
def test_deepspeed_zero3_two_processes_match_single_process_and_resume(data, single_mixed, tmp_path):
    zero3 = ["train.sharding=zero3", "train.zero3_persistence_threshold=0", *MIXED]  # 0: every parameter sharded
    multi = torchrun(data, tmp_path / "run", *zero3)
    print({s: (round(single_mixed[s]["loss"], 6), round(multi[s]["loss"], 6)) for s in single_mixed})
    assert_match(single_mixed, multi)
    # resume from the step-2 checkpoint (DeepSpeed engine files + per-rank EMA partitions) -> same steps 3, 4
    step2 = tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(2)
    assert sorted(p.name for p in step2.glob("ema_rank*.pt")) == ["ema_rank0.pt", "ema_rank1.pt"]
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    resumed = torchrun(data, tmp_path / "resumed", *zero3)
    assert_match({s: multi[s] for s in (3, 4)}, resumed, steps=(3, 4))
