"""Training smoke tests on CPU with the tiny model: losses fall, exact resume after SIGKILL, atomic and pruned
checkpoints, non-finite stop, EMA export in the official layout, LoRA and freezing."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import BagelConfig, ConfigError
from bagel_ft.modeling import Bagel
from bagel_ft.tokenizer import ByteTokenizer, load_tokenizer
from training import checkpoint as ckpt
from training.config import load_config
from training.metrics import read_metrics
from training.synthetic import write_table
from training.trainer import Trainer, TrainingStopped

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train" / "tiny_cpu.yaml"
FAST = ["data.prefetch=0", "optim.warmup_steps=2", "train.log_every=1000"]  # tiny_cpu.yaml: ~0.2 s per step


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data") / "synthetic", records=24, size=(16, 16), rows_per_file=12)


def overrides(data, run_dir, *extra):
    return [f"data.sources=[{{path: {data}}}]", f"run.dir={run_dir}", *FAST, *extra]


def config(data, run_dir, *extra):
    return load_config(TINY, overrides(data, run_dir, *extra))


def test_both_losses_fall(data, tmp_path):
    state = (
        Trainer(config(data, tmp_path, "train.steps=40", "train.save_every=1000", "train.export_ema=false"))
        .setup()
        .train()
    )
    assert state.step == 40
    m = read_metrics(tmp_path)
    first, last = [m[s] for s in range(1, 9)], [m[s] for s in range(33, 41)]

    def mean(rows, key):  # token-weighted: some packs hold no CE or no MSE positions
        n = sum(r[f"{key}_tokens"] for r in rows)
        return sum(r[key] * r[f"{key}_tokens"] for r in rows) / n

    print(
        f"CE {mean(first, 'ce'):.3f} -> {mean(last, 'ce'):.3f}, MSE {mean(first, 'mse'):.3f} -> {mean(last, 'mse'):.3f}"
    )
    assert mean(last, "ce") < 0.6 * mean(first, "ce")
    assert mean(last, "mse") < 0.95 * mean(first, "mse")
    assert all(0 < m[s]["packing_efficiency"] <= 1 for s in m)


# `bagel-ft train` in a subprocess that SIGKILLs itself as step KILL_AT_STEP begins: the kill lands at the same
# step on any machine (no polling, no timing)
KILLED_AT_STEP = """
import os, signal, sys
from training.trainer import Trainer
calls, step = [0], Trainer.train_step
def train_step(self, packs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, packs)
Trainer.train_step = train_step
from commands.main import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _run_cli(args, kill_at_step: int | None = None, **kw):
    code = ["-c", KILLED_AT_STEP] if kill_at_step else ["-m", "commands.train"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"KILL_AT_STEP": str(kill_at_step)} if kill_at_step else {})}
    return subprocess.Popen(
        [sys.executable, *code, str(TINY), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_sigkill_and_resume_reproduce_the_uninterrupted_run_exactly(data, tmp_path):
    """A checkpoint every 3 steps; the run is SIGKILLed after step 7 and resumed from step 6."""
    tiny = tmp_path / "tiny_model"  # start from a saved tiny checkpoint (the pretrained path)
    torch.manual_seed(0)
    tiny_cfg = BagelConfig.preset("tiny")
    Bagel(tiny_cfg).attach_vae(AutoEncoder(tiny_cfg.vae)).save_pretrained(tiny)
    ByteTokenizer().save_pretrained(tiny)
    common = [
        "model.init=pretrained",
        f"model.path={tiny}",
        "model.tokenizer=",
        "train.steps=10",
        "train.save_every=3",
        "train.export_ema=false",
        "data.prefetch=2",  # packs built ahead in a thread: the saved data state must be the consumed one
    ]

    killed = tmp_path / "killed"
    proc = _run_cli(overrides(data, killed, *common), kill_at_step=8)  # killed as step 8 begins
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    assert (
        sorted(read_metrics(killed)) == list(range(1, 8))
        and ckpt.latest_checkpoint(killed / "checkpoints").name == "step_00000006"
    )
    resumed = _run_cli(overrides(data, killed, *common))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "step_00000006" in out

    straight = tmp_path / "straight"
    Trainer(config(data, straight, *common)).setup().train()
    a, b = read_metrics(straight), read_metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in a:
        for key in ("loss", "ce", "mse", "grad_norm", "lr"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


def test_checkpoints_are_atomic_and_pruned(data, tmp_path, monkeypatch):
    cfg = config(data, tmp_path, "train.steps=6", "train.save_every=2", "train.keep_last=2", "train.export_ema=false")
    Trainer(cfg).setup().train()
    root = tmp_path / "checkpoints"
    names = [p.name for p in ckpt.complete_checkpoints(root)]
    assert names == ["step_00000004", "step_00000006"]  # keep_last=2
    files = {p.name for p in (root / names[-1]).iterdir()}
    assert {"COMPLETE", "meta.json", "extra_rank0.pt", ".metadata"} <= files
    extra = torch.load(root / names[-1] / "extra_rank0.pt", weights_only=False)
    assert extra["step"] == 6 and {"python", "numpy", "torch"} <= set(extra["rng"]) and len(extra["data"]) == 1

    # a crash in the middle of the next save leaves step_8.tmp behind, never a complete-looking step_8
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while saving")

    monkeypatch.setattr(ckpt, "_write_marker", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(
            load_config(
                TINY,
                overrides(
                    data, tmp_path, "train.steps=8", "train.save_every=2", "train.keep_last=2", "train.export_ema=false"
                ),
            )
        ).setup().train()
    assert (root / "step_00000008.tmp").is_dir() and not (root / "step_00000008").exists()
    assert ckpt.latest_checkpoint(root).name == "step_00000006"


def test_nonfinite_steps_stop_the_run_naming_step_and_records(data, tmp_path):
    trainer = Trainer(
        config(
            data,
            tmp_path,
            "train.steps=10",
            "train.max_nonfinite_steps=3",
            "train.save_every=1000",
            "train.export_ema=false",
        )
    ).setup()
    with torch.no_grad():
        trainer.model.llm2vae.weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingStopped) as e:
        trainer.train()
    msg = str(e.value)
    print(msg)
    assert "stopped at step 3" in msg and "3 non-finite steps in a row" in msg
    assert "step 1: ['" in msg and "step 3: ['" in msg  # the records each bad step saw
    assert trainer.state.nonfinite_total == 3
    for n, p in trainer.model.named_parameters():  # no update was applied
        assert torch.equal(p, before[n]) or n.startswith("llm2vae"), n


def test_random_init_must_be_explicit(data, tmp_path):
    cfg = config(data, tmp_path, "model.init=pretrained", f"model.path={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="model.init: random"):
        Trainer(cfg).setup()


def test_ema_export_loads_in_the_official_layout(data, tmp_path):
    state = (
        Trainer(config(data, tmp_path, "train.steps=3", "train.save_every=3", "optim.ema_decay=0.5")).setup().train()
    )
    assert state.step == 3
    export = tmp_path / "export"
    model = Bagel.from_pretrained(export)
    assert isinstance(load_tokenizer(export), ByteTokenizer)
    last = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    import torch.distributed.checkpoint as dcp

    ema = {k: torch.empty_like(v) for k, v in model.state_dict().items() if not k.endswith("pos_embed")}
    dcp.load({"ema": ema}, checkpoint_id=str(last), no_dist=True)
    for k, v in ema.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_lora_trains_adapters_only_and_exports_merged(data, tmp_path):
    trainer = Trainer(
        config(
            data, tmp_path, "train.steps=2", "train.save_every=2", "lora.enabled=true", "lora.rank=4", "optim.lr=1e-2"
        )
    ).setup()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("q_proj_moe_gen.lora_A" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
    exported = Bagel.from_pretrained(tmp_path / "export")  # strict load: official keys only, adapters merged
    merged = exported.language_model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged, base["language_model.model.layers.0.self_attn.q_proj.weight"])


def test_freeze_switches(data, tmp_path):
    trainer = Trainer(
        config(
            data,
            tmp_path,
            "train.steps=2",
            "freeze.vit=true",
            "freeze.und_expert=true",
            "train.save_every=1000",
            "train.export_ema=false",
        )
    ).setup()
    frozen = {
        n: p.detach().clone()
        for n, p in trainer.model.named_parameters()
        if n.startswith("vit_model.") or (n.startswith("language_model.") and "_moe_gen" not in n)
    }
    assert frozen and not any(p.requires_grad for n, p in trainer.model.named_parameters() if n in frozen)
    trainer.train()
    for n, p in trainer.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---- data streams ------------------------------------------------------------------------------------------


def _stream(tables, stream=0, num_streams=1, seed=0):
    from bagel_ft.tokenizer import ByteTokenizer, SpecialTokens
    from bagel_ft.transforms import ImageGeometry as Bounds
    from training.data import DataStream, StreamSpec
    from training.packing import CFGDropout, PackingGeometry
    from training.sequence import PlanGeometry

    mcfg, tok = BagelConfig.preset("tiny"), ByteTokenizer()
    spec = StreamSpec(
        tok.encode,
        SpecialTokens.of(tok),
        PlanGeometry(Bounds(16, 16, 56, 28, 10**6), mcfg.latent_downsample, mcfg.vit.patch_size),
        PackingGeometry.from_model_config(mcfg),
        CFGDropout(0.1, 0.3, 0.3),
        {},
        True,
        expected_num_tokens=256,
        max_num_tokens=320,
        max_num_tokens_per_sample=320,
        prefer_buffer_before=160,
        max_buffer_size=4,
    )
    return DataStream(tables, [1.0] * len(tables), spec, seed, stream, num_streams)


def _same_batch(a, b):
    for name in ("packed_text_ids", "packed_position_ids", "packed_timesteps", "noise", "padded_images"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert a.split_lens == b.split_lens and a.attn_modes == b.attn_modes


def test_stream_state_round_trip_and_sharding(data, tmp_path):
    from training.data import RecordTable

    tables = [RecordTable(data)]
    a = _stream(tables)
    for _ in range(5):
        a.next_pack()
    state = a.state_dict()
    expected = [a.next_pack() for _ in range(4)]
    b = _stream([RecordTable(data)])
    b.load_state_dict(state)
    for want, got in zip(expected, [b.next_pack() for _ in range(4)], strict=True):
        assert want.record_ids == got.record_ids and want.seed == got.seed
        _same_batch(want.batch, got.batch)
    # streams of one epoch see disjoint records; together every record
    seen = [set(), set()]
    for s in range(2):
        st = _stream(tables, stream=s, num_streams=2)
        while st.epochs[0] == 0:
            seen[s].add(int(st._order(0)[st.cursors[0]]))
            st.cursors[0] += 1
            if st.cursors[0] >= len(st._order(0)):
                break
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(tables[0])


def test_record_table_formats_and_subset_filter(data, tmp_path):
    import datasets

    from bagel_ft.trajectory import datasets_features
    from training.data import RecordTable

    parquet = RecordTable(data)
    rows = [parquet.get(i).to_row() for i in range(len(parquet))]
    datasets.Dataset.from_list(rows, features=datasets_features()).save_to_disk(str(tmp_path / "disk"))
    disk = RecordTable(tmp_path / "disk")
    assert [disk.get(i).id for i in range(len(disk))] == [r["id"] for r in rows]
    assert disk.get(3).turns == parquet.get(3).turns
    t2i = RecordTable(data, subsets=["t2i"])
    assert 0 < len(t2i) < len(parquet) and all(t2i.get(i).subset == "t2i" for i in range(len(t2i)))
