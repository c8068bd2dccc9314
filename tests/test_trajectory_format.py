"""The trajectory format (docs/format.md): validation, tags, row round-trip through `datasets`."""

import datasets
import pytest
from PIL import Image

from bagel_ft.trajectory import (
    FormatError,
    Trajectory,
    Turn,
    datasets_features,
    extract,
    inspect_text,
    normalize_row,
    parse_verdict,
    plan_text,
    record_id,
    refine_text,
)


def _traj(**kw):
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    turns = [
        Turn("plan", plan_text("draw a red square", "a red square")),
        Turn("image", image=0),
        Turn("inspect", inspect_text("inconsistent", "the square is blue")),
        Turn("refine", refine_text("make the square red")),
        Turn("image", image=1),
        Turn("inspect", inspect_text("consistent")),
    ]
    args = dict(
        prompt="a red square",
        turns=turns,
        images=[blue, red],
        subset="critique",
        label="inconsistent",
        meta={"seed": 3},
    )
    args.update(kw)
    return Trajectory(**args)


def test_tags_round_trip():
    text = plan_text("add a blue circle", "a red square left of a blue circle")
    assert extract("ins", text) == "add a blue circle"
    assert extract("des", text) == "a red square left of a blue circle"
    assert parse_verdict(inspect_text("consistent")) == "consistent"
    assert parse_verdict("<inspect>maybe</inspect>") is None
    assert extract("refine", "no tags") is None
    with pytest.raises(FormatError):
        inspect_text("fine")


def test_ids_are_deterministic_and_distinct():
    assert _traj().id == _traj().id == record_id("critique", "a red square", 3)
    assert _traj(meta={"seed": 4}).id != _traj().id


def test_row_round_trip_through_parquet(tmp_path):
    traj = _traj()
    traj.validate()
    ds = datasets.Dataset.from_list([traj.to_row()], features=datasets_features())
    ds.to_parquet(str(tmp_path / "part.parquet"))
    back = datasets.Dataset.from_parquet(str(tmp_path / "part.parquet"))
    loaded = Trajectory.from_row(normalize_row(back[0]))
    assert loaded.turns == traj.turns and loaded.meta == traj.meta and loaded.id == traj.id
    assert [im.tobytes() for im in loaded.images] == [im.tobytes() for im in traj.images]
    assert loaded.final_image().getpixel((0, 0)) == (255, 0, 0)
    assert len(loaded.generated_images()) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(subset="video"), "subset"),
        (dict(label="ok"), "label"),
        (dict(format_version=0), "format_version"),
        (
            dict(turns=[Turn("plan", "<ins>x</ins><des>y"), Turn("image", image=0), Turn("image", image=1)]),
            "unbalanced",
        ),
        (dict(turns=[Turn("image", image=0), Turn("image", image=5)]), r"turns\[1\].image"),
        (dict(turns=[Turn("image", image=0)]), "turns use"),
        (dict(turns=[Turn("sketch", "x")]), "role"),
        (dict(turns=[]), "at least one"),
    ],
)
def test_invalid_records_name_the_field(change, message):
    with pytest.raises(FormatError, match=message):
        _traj(**change).validate()


def test_next_after_text_names_what_the_model_must_predict():
    from bagel_ft.trajectory import NEXT_DRAW, NEXT_END, NEXT_TEXT, next_after_text

    turns = _traj().turns  # plan, image, inspect(inconsistent), refine, image, inspect(consistent)
    assert [next_after_text(turns, i) for i in (0, 2, 3, 5)] == [NEXT_DRAW, NEXT_TEXT, NEXT_DRAW, NEXT_END]
    given = [
        Turn("plan", plan_text("a", "b")),
        Turn("image", image=0, loss=False),
        Turn("inspect", inspect_text("consistent")),
    ]
    assert next_after_text(given, 0) is None
    with pytest.raises(FormatError, match="image"):
        next_after_text(turns, 1)
