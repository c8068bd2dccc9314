"""The three pipelines offline (the shapes world): valid records, exact ratios and labels, sharding and merge."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from bagel_ft.trajectory import Trajectory, normalize_row, parse_verdict
from data_gen import alignment, critiques, trajectories
from data_gen.config import load_config
from data_gen.runner import run_pipeline, shapes_prompts
from data_gen.shards import merge, select_items

NUM = 12
PROMPTS = shapes_prompts(NUM, seed=0, categories=None)


def build(module, out, prompts=PROMPTS, shard=(0, 1), overrides=()):
    cfg = load_config(None, ["pipeline.chunk_size=5", *overrides])
    return asyncio.run(
        run_pipeline(module.NAME, module.build, cfg, prompts, out, shard=shard, with_sampler=module is critiques)
    )


def records(*dirs) -> list[Trajectory]:
    return [Trajectory.from_row(normalize_row(row)) for row in merge(list(dirs))]  # from_row validates


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("subsets")
    results = {m.NAME: build(m, root / m.NAME) for m in (trajectories, critiques, alignment)}
    return root, results


def test_trajectories(built):
    root, results = built
    recs = records(root / "trajectories")
    assert results["trajectories"].complete and len(recs) == results["trajectories"].total.kept >= NUM - 3
    rejected = results["trajectories"].total.rejected
    assert set(rejected) <= {"plan_too_short"}  # single-object prompts only; every drawn step passed the judge
    for t in recs:
        assert t.subset == "trajectory" and t.label == ""
        roles = [turn.role for turn in t.turns]
        assert roles == ["plan", "image", "inspect"] * len(t.images) and 3 <= len(t.images) <= 5
        assert all(turn.loss for turn in t.turns)
        assert all(parse_verdict(turn.text) == "consistent" for turn in t.turns if turn.role == "inspect")
        assert t.meta["steps"][-1]["graph"] == t.meta["scene_graph"]


def test_critiques_have_both_labels_and_agree_with_the_drafters_mistakes(built):
    root, results = built
    recs = records(root / "critiques")
    assert results["critiques"].complete and len(recs) == NUM
    assert set(Counter(t.label for t in recs)) == {"consistent", "inconsistent"}
    for t in recs:
        assert t.subset == "critique"
        mistakes = t.meta["sampler_meta"]["mistakes"]
        # the judge finds exactly the mistakes the drafter made, at the step it made them
        assert (t.label == "inconsistent") == bool(mistakes)
        if mistakes:
            assert t.meta["step"] == mistakes[0]["step"]
            assert [turn.role for turn in t.turns] == ["plan", "image", "inspect", "refine", "image", "inspect"]
            assert [turn.loss for turn in t.turns] == [False, False, True, True, True, True]
            assert parse_verdict(t.turns[2].text) == "inconsistent" and parse_verdict(t.turns[5].text) == "consistent"
        else:
            assert [turn.role for turn in t.turns] == ["plan", "image", "inspect"]


def test_alignment_ratio_is_one_to_two(built):
    root, results = built
    recs = records(root / "alignment")
    by_prompt = Counter((t.meta["prompt"], t.label) for t in recs)
    assert len(recs) == 3 * NUM == results["alignment"].total.kept
    for prompt in PROMPTS:
        assert by_prompt[(prompt, "consistent")] == 1 and by_prompt[(prompt, "inconsistent")] == 2
    negatives = [t for t in recs if t.label == "inconsistent"]
    assert Counter(t.meta["mode"] for t in negatives) == {"image": NUM, "instruction": NUM}
    assert all(t.turns[-1].role == "refine" for t in negatives)


def test_three_shards_merge_to_the_unsharded_run(built, tmp_path):
    root, _ = built
    shards = [tmp_path / f"s{i}" for i in range(3)]
    for i, d in enumerate(shards):
        build(trajectories, d, shard=(i, 3))
    parts = [set(it.prompt for it in select_items(PROMPTS, None, (i, 3), 0)) for i in range(3)]
    assert sum(map(len, parts)) == NUM and set().union(*parts) == set(PROMPTS)  # a partition
    merged = merge(shards)
    assert len(set(merged["id"])) == len(merged)
    assert merged.to_list() == merge([root / "trajectories"]).to_list()
    assert merge([*shards, shards[0]]).to_list() == merged.to_list()  # merging a shard twice adds nothing


def test_rerun_skips_finished_chunks(built, tmp_path):
    root, _ = built
    again = build(trajectories, root / "trajectories")
    assert again.this_run.items == 0 and again.complete  # every chunk is in the manifest


def test_merge_command_writes_a_loadable_dataset(built, tmp_path, capsys):
    import argparse

    import pyarrow.parquet as pq

    from commands import data as cli

    root, _ = built
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["merge", "--out", str(tmp_path / "m"), str(root / "critiques"), str(root / "alignment")])
    assert cli.run(args) == 0
    files = sorted((tmp_path / "m").glob("data-*.parquet"))
    assert sum(pq.read_metadata(f).num_rows for f in files) == NUM + 3 * NUM
    args = parser.parse_args(["merge", "--out", str(tmp_path / "m2"), str(tmp_path)])  # no manifest there
    assert cli.run(args) == 2 and "no manifest" in capsys.readouterr().err
