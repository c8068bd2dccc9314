"""GenEval: the official layout (checked by a re-implementation of the official scorer's walker),
resuming (including after SIGKILL), and the summary of summary_scores.py against hand-computed values."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from eval import geneval
from eval.generator import Generation
from eval.run_dir import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SHARED_METADATA = REPO.parent / "shared" / "benchmarks" / "geneval" / "evaluation_metadata.jsonl"

LINES = [  # the shape of evaluation_metadata.jsonl lines (spacing kept exactly as in the file)
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "single_object", "include": [{"class": "cow", "count": 1}], "prompt": "a photo of a cow"}',
    '{"tag": "two_object", "include": [{"class": "toaster", "count": 1}, {"class": "oven", "count": 1}], "prompt": "a photo of a toaster and an oven"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], "prompt": "a photo of two clocks"}',
    '{"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}], "prompt": "a photo of a dog right of a cat"}',
]


class CountingGenerator:
    """Deterministic images from (prompt, seed); counts calls."""

    name = "test:counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompt, seed):
        self.calls += 1
        color = (hash(prompt) % 256, seed % 256, 7)
        return Generation(image=Image.new("RGB", (8, 8), color), cost={"images": 1, "flow_steps": 10, "tokens": 3})


@pytest.fixture
def metadata(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    return path


def official_walk(imagedir):
    """evaluate_images.py `main`'s walk, line for line (minus the detector): which (image, metadata) it scores."""
    seen = []
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            seen.append((imagepath, metadata))
    return seen


def test_layout_is_what_the_official_scorer_reads(metadata, tmp_path):
    out = tmp_path / "run"
    gen = CountingGenerator()
    stats = geneval.generate_geneval(gen, metadata, out, n=4, grid=True, progress=False)
    assert stats == dict(prompts=5, generated_prompts=5, skipped_prompts=0, generated_samples=20)
    (out / ".tmp-00003-debris").mkdir()  # what a killed run leaves: must be invisible to the scorer
    walked = official_walk(out)
    assert len(walked) == 20
    raw = metadata.read_bytes().splitlines(keepends=True)
    for path, meta in walked:
        folder = Path(path).parent.parent
        assert re.fullmatch(r"\d{5}", folder.name) and re.fullmatch(r"\d{4}\.png", Path(path).name)
        assert (folder / "metadata.jsonl").read_bytes() == raw[int(folder.name)]  # byte-identical line
        assert meta == json.loads(LINES[int(folder.name)])
        assert Image.open(path).size == (8, 8)
    assert all((out / f"{i:05d}" / "grid.png").exists() for i in range(5))
    gen_rows = read_jsonl(out / "00002" / "gen.jsonl")
    assert [r["seed"] for r in gen_rows] == [2000, 2001, 2002, 2003]  # sample_seed(0, 2, s)


def test_resume_skips_finished_prompts_and_extends_n(metadata, tmp_path):
    out = tmp_path / "run"
    first = CountingGenerator()
    geneval.generate_geneval(first, metadata, out, n=2, progress=False)
    assert first.calls == 10
    again = CountingGenerator()
    assert geneval.generate_geneval(again, metadata, out, n=2, progress=False)["skipped_prompts"] == 5
    assert again.calls == 0
    before = (out / "00001" / "samples" / "0000.png").read_bytes()
    more = CountingGenerator()
    geneval.generate_geneval(more, metadata, out, n=4, progress=False)
    assert more.calls == 10  # only samples 2 and 3 of each prompt
    assert (out / "00001" / "samples" / "0000.png").read_bytes() == before
    assert len(read_jsonl(out / "00001" / "gen.jsonl")) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_subset_and_limit_keep_line_indices(metadata, tmp_path):
    out = tmp_path / "run"
    geneval.generate_geneval(CountingGenerator(), metadata, out, n=1, limit=1, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00002", "00003", "00004"]
    out2 = tmp_path / "run2"
    geneval.generate_geneval(CountingGenerator(), metadata, out2, n=1, subset=["counting"], progress=False)
    assert [p.name for p in out2.iterdir()] == ["00003"]
    with pytest.raises(ValueError, match="unknown GenEval tags"):
        geneval.generate_geneval(CountingGenerator(), metadata, out2, subset=["colour"], progress=False)


def test_summary_matches_summary_scores_by_hand():
    def row(folder, sample, tag, correct, meta):
        return {
            "filename": f"/x/{folder}/samples/{sample}.png",
            "tag": tag,
            "correct": correct,
            "metadata": meta,
            "prompt": meta,
            "reason": "",
        }

    rows = [
        row("00000", "0000", "single_object", True, "A"),
        row("00000", "0001", "single_object", False, "A"),
        row("00001", "0000", "single_object", True, "B"),
        row("00005", "0000", "counting", False, "C"),
        row("00005", "0001", "counting", False, "C"),
        row("00007", "0000", "position", True, "D"),
        row("00007", "0001", "position", False, "D"),
    ]
    s = geneval.summarize_results(rows)
    # per tag: single_object 2/3, counting 0/2, position 1/2; overall = mean over tags
    assert list(s["categories"]) == ["single_object", "counting", "position"]  # groupby(sort=False) order
    assert s["categories"]["single_object"] == {"score": pytest.approx(2 / 3), "correct": 2, "n": 3}
    assert s["categories"]["counting"]["score"] == 0.0 and s["categories"]["position"]["score"] == 0.5
    assert s["overall"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    assert s["total_images"] == 7 and s["total_prompts"] == 4
    assert s["correct_images"] == pytest.approx(3 / 7)
    assert s["correct_prompts"] == pytest.approx(3 / 4)  # A, B, D have a correct image
    text = geneval.format_summary(s)
    assert "single_object    = 66.67% (2 / 3)" in text and "Overall score (avg. over tasks): 0.38889" in text


def test_score_reads_official_results_and_writes_records(metadata, tmp_path, monkeypatch):
    monkeypatch.delenv("GENEVAL_REPO", raising=False)
    out = tmp_path / "run"
    geneval.generate_geneval(CountingGenerator(), metadata, out, n=2, progress=False)
    assert geneval.score_geneval(out, log=lambda s: None) is None  # no scorer installed: unscored summary
    assert json.loads((out / "summary.json").read_text())["scored"] is False
    results = []  # what evaluate_images.py writes: one row per walked image
    for path, meta in official_walk(out):
        ok = meta["tag"] != "counting"
        results.append(
            {
                "filename": path,
                "tag": meta["tag"],
                "prompt": meta["prompt"],
                "correct": ok,
                "reason": "" if ok else "expected clock>=2, found 1",
                "metadata": json.dumps(meta),
                "details": "{}",
            }
        )
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    summary = geneval.score_geneval(out, log=lambda s: None)
    assert summary["categories"]["counting"] == {"score": 0.0, "correct": 0, "n": 2}
    assert summary["overall"] == pytest.approx(3 / 4)  # 4 tags, counting wrong
    records = read_jsonl(out / "records.jsonl")
    assert len(records) == 10 and {r["key"] for r in records} >= {"00003/0000", "00003/0001"}
    bad = [r for r in records if r["correct"] is False]
    assert (
        len(bad) == 2
        and bad[0]["reasons"] == ["expected clock>=2, found 1"]
        and bad[0]["image"] == "00003/samples/0000.png"
    )
    assert records[0]["cost"]["flow_steps"] == 10
    saved = json.loads((out / "summary.json").read_text())
    assert saved["scored"] and saved["cost_per_sample"]["flow_steps"] == 10
    # a sample added after scoring makes results.jsonl stale: it is not silently reused
    geneval.generate_geneval(CountingGenerator(), metadata, out, n=3, progress=False)
    assert not geneval.results_cover_samples(out, read_jsonl(out / "results.jsonl"))


@pytest.mark.skipif(not SHARED_METADATA.exists(), reason="shared benchmark data not present")
def test_shared_metadata_file_reads():
    entries = geneval.load_metadata(SHARED_METADATA)
    assert len(entries) == 553
    assert {e[2]["tag"] for e in entries} == set(geneval.TAGS)
    assert len(geneval.select_prompts(entries, limit=2)) == 12


# a generator that logs each call and SIGKILLs its own process in call $KILL_AT_CALL (the same point on any machine)
SLOW_GENERATOR = """
import os, signal
from PIL import Image
from eval.generator import Generation

class Slow:
    name = "test:slow"
    def __init__(self, log):
        self.log = log
    def __call__(self, prompt, seed):
        with open(self.log, "a") as f:
            f.write(f"{seed}\\n")
        if len(open(self.log).read().split()) == int(os.environ.get("KILL_AT_CALL", 0)):
            os.kill(os.getpid(), signal.SIGKILL)
        return Generation(image=Image.new("RGB", (8, 8), (seed % 256, len(prompt), 0)))

def make(mode="single"):
    return Slow(os.environ["CALLS_LOG"])
"""


def test_sigkill_midway_then_resume_redraws_only_unfinished(metadata, tmp_path):
    (tmp_path / "slowgen.py").write_text(SLOW_GENERATOR)
    log = tmp_path / "calls.log"
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", CALLS_LOG=str(log), KILL_AT_CALL="5")
    cmd = [
        sys.executable,
        "-m",
        "commands.eval",  # == `bagel-ft eval`
        "geneval",
        "--ckpt",
        "py:slowgen:make",
        "--out",
        str(out),
        "--metadata",
        str(metadata),
        "--n",
        "2",
        "--stage",
        "generate",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = [p.name for p in out.iterdir() if p.name.isdigit()]
    assert len(done) == 2  # killed in the middle of the third prompt: two finished, the rest not
    assert all(len(list((out / d / "samples").iterdir())) == 2 for d in done)

    sys.path.insert(0, str(tmp_path))
    try:
        import slowgen

        gen = slowgen.Slow(str(tmp_path / "resume.log"))
        geneval.generate_geneval(gen, metadata, out, n=2, progress=False)
    finally:
        sys.path.remove(str(tmp_path))
    redrawn = (tmp_path / "resume.log").read_text().split()
    assert len(redrawn) == 2 * (5 - len(done))
    assert not any(int(s) // 1000 == int(d) for s in redrawn for d in done)  # finished prompts untouched
    assert len(official_walk(out)) == 10 and not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


FAKE_SCORER = """
import argparse, json, os, re
p = argparse.ArgumentParser()
p.add_argument("imagedir"); p.add_argument("--outfile"); p.add_argument("--model-path")
a = p.parse_args()
rows = []
for sub in sorted(os.listdir(a.imagedir)):
    folder = os.path.join(a.imagedir, sub)
    if not os.path.isdir(folder) or not sub.isdigit():
        continue
    meta = json.load(open(os.path.join(folder, "metadata.jsonl")))
    for name in sorted(os.listdir(os.path.join(folder, "samples"))):
        if re.match(r"\\d+\\.png", name):
            rows.append({"filename": os.path.join(folder, "samples", name), "tag": meta["tag"], "prompt": meta["prompt"],
                         "correct": name == "0000.png", "reason": "", "metadata": json.dumps(meta),
                         "model_path": a.model_path})
open(a.outfile, "w").write("".join(json.dumps(r) + "\\n" for r in rows))
"""


def test_official_scorer_is_run_when_found(metadata, tmp_path, monkeypatch):
    repo = tmp_path / "geneval"
    (repo / "evaluation").mkdir(parents=True)
    script = repo / "evaluation" / "evaluate_images.py"
    script.write_text(FAKE_SCORER)
    script_found, why = geneval.find_official_scorer(str(repo))
    if script_found is None:  # no mmdet / CUDA here: the reason says so
        assert "mmdet" in why or "CUDA" in why
    assert geneval.find_official_scorer(str(tmp_path / "nowhere"))[0] is None
    monkeypatch.setattr(geneval, "find_official_scorer", lambda repo=None: (script, ""))
    out = tmp_path / "run"
    geneval.generate_geneval(CountingGenerator(), metadata, out, n=2, progress=False)
    summary = geneval.score_geneval(out, model_path="/models/m2f", log=lambda s: None)
    assert summary["overall"] == 0.5 and summary["total_images"] == 10  # sample 0 right, sample 1 wrong
    results = read_jsonl(out / "results.jsonl")
    assert results[0]["model_path"] == "/models/m2f" and not list(out.glob(".tmp-*"))


def test_a_run_dir_refuses_a_different_config(metadata, tmp_path, capsys):
    from commands.main import main as cli_main

    out = tmp_path / "run"
    base = ["eval", "geneval", "--ckpt", "debug:noise", "--out", str(out), "--metadata", str(metadata), "--n", "1",
            "--stage", "generate", "--quiet"]  # fmt: skip
    assert cli_main(base) == 0
    assert cli_main(base + ["--n", "2"]) == 0  # more samples: the same run, extended
    assert cli_main(base + ["--mode", "psir"]) == 2
    assert "different config (mode: 'single' -> 'psir')" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["n"] == 2 and config["generator"] == "debug:noise" and config["mode"] == "single"


def test_a_failed_run_leaves_its_folder_usable(metadata, tmp_path, capsys):
    """A mistyped --ckpt fails with one line (exit 2); the corrected command then runs in the same folder."""
    from commands.main import main as cli_main

    out = tmp_path / "run"
    args = ["eval", "geneval", "--out", str(out), "--metadata", str(metadata), "--n", "1", "--stage", "generate",
            "--quiet"]  # fmt: skip
    assert cli_main(args + ["--ckpt", str(tmp_path / "no-such-ckpt")]) == 2
    err = capsys.readouterr().err
    assert "no-such-ckpt" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert cli_main(args + ["--ckpt", "debug:noise"]) == 0
    assert json.loads((out / "config.json").read_text())["ckpt"] == "debug:noise"
