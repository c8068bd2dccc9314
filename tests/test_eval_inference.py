"""The adapter to `inference`: the tiny reference checkpoint evaluated end to end through `bagel-ft eval`
(single mode) and through PSIR (which the untrained model may end without drawing: a black stand-in,
flagged and judged wrong), with the shipped inference YAMLs parsed into `GenerateOptions`."""

import json
from pathlib import Path

import pytest
import yaml

from commands.main import main as cli_main
from common.config import ConfigError, build
from eval import shapes_eval
from eval.generator import InferenceGenerator, generate
from eval.run_dir import read_jsonl

inference = pytest.importorskip("inference")
pytest.importorskip("scene_graphs.shapes")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO.parent / "shared" / "reference" / "tiny"
TINY_YAML = REPO / "configs" / "eval" / "inference_tiny_cpu.yaml"


def test_shipped_inference_configs_parse():
    for path in sorted((REPO / "configs" / "eval").glob("inference_*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert set(data) <= {"load", "options"}, path
        opts = build(inference.GenerateOptions, data.get("options") or {})
        assert opts.flow.height > 0 and isinstance(opts.flow.cfg_interval, tuple)
    with pytest.raises(ConfigError, match="flow.heigth: unknown key; did you mean flow.height?"):
        build(inference.GenerateOptions, {"flow": {"heigth": 3}})


@pytest.mark.skipif(not TINY.exists(), reason="shared reference checkpoint not present")
def test_tiny_checkpoint_end_to_end(tmp_path):
    out = tmp_path / "tiny-single"
    args = [
        "eval",
        "shapes",
        "--ckpt",
        str(TINY),
        "--mode",
        "single",
        "--n",
        "1",
        "--limit",
        "1",
        "--subset",
        "single_object,colors",
        "--inference-config",
        str(TINY_YAML),
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli_main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["generator"] == "inference:single" and config["inference"]["options"]["flow"]["height"] == 32
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 2 and all(r["correct"] is not None for r in records)
    assert records[0]["cost"]["images"] == 1 and records[0]["cost"]["flow_steps"] == 3  # 4 schedule points
    assert records[0]["trajectory"] == "trajectories/00000_00.traj"  # the t2i record of the stream

    psir = InferenceGenerator(str(TINY), "psir", yaml.safe_load(TINY_YAML.read_text()))
    g = generate(psir, shapes_eval.load_prompts()[0]["prompt"], 0)
    assert g.image is not None and g.cost["tokens"] > 0
    assert g.no_image == (g.trajectory is None or not g.trajectory.generated_images())
    assert psir.with_mode("single").name == "inference:single"
