"""common.config (the one config mechanism) and bagel_ft.segments (the one segment layout), on hand-sized inputs."""

from dataclasses import dataclass, field

import pytest

from bagel_ft.segments import CAUSAL, FULL, NOISE, dropped_rope, image_segment, text_segment
from common.config import ConfigError, apply_overrides, build, describe, field_type, load, merge, setting


@dataclass
class Inner:
    size: int = setting(64, "pixels per side")
    interval: tuple[float, float] = setting((0.0, 1.0), "where CFG applies")
    name: str = setting("", "a name", ("", "a", "b"))


@dataclass
class Outer:
    lr: float = setting(1e-3, "learning rate")
    inner: Inner = setting(Inner(), "a section")
    tags: list[str] = field(default_factory=list, metadata={"doc": "tags"})
    limit: int | None = setting(None, "optional")


def test_one_syntax_one_meaning():
    cfg = load(Outer, None, ["lr=3e-3", "inner.interval=[0.4, 1]", "inner.name=", "tags=[x, y]", "limit=null"])
    assert cfg.lr == 3e-3 and isinstance(cfg.lr, float)  # YAML reads 3e-3 as a string: still a number
    assert cfg.inner.interval == (0.4, 1.0) and cfg.inner.name == "" and cfg.tags == ["x", "y"] and cfg.limit is None
    assert cfg.inner.size == 64  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.sise=3", "inner.sise: unknown key; did you mean inner.size?"),
        ("size=3", "size: unknown key; did you mean inner.size?"),
        ("inner.size=big", "inner.size: expected an integer, got 'big'"),
        ("inner.interval=[1]", "inner.interval: expected a list of 2 values, got [1]"),
        ("inner.name=c", "inner.name: expected one of ['', 'a', 'b'], got 'c'"),
        ("inner=3", "inner: expected a mapping, got 3"),
        ("lr", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load(Outer, None, [override])
    assert message in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner: {size: big}\n")
    with pytest.raises(ConfigError, match=f"{path}: inner.size: expected an integer"):
        load(Outer, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load(Outer, tmp_path / "nope.yaml")


def test_merge_prefix_field_type_and_describe():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ConfigError, match="options.inner.size: expected an integer"):
        build(Outer, {"inner": {"size": "x"}}, prefix="options.")
    assert field_type(Outer, "inner.interval") == tuple[float, float]
    assert "  inner.size = 64  # pixels per side" in describe(Outer)


def test_segment_layout():
    """Text: consecutive RoPE ids, rope += length; a clean image block: one id, +1; a noisy one: one id, +0."""
    text = text_segment(start=0, rope=0, length=4)
    assert (text.attn_mode, text.position_ids, text.next_rope, text.end) == (CAUSAL, [0, 1, 2, 3], 4, 4)
    clean = image_segment(start=4, rope=4, num_tokens=3)
    assert (clean.attn_mode, clean.position_ids, clean.next_rope) == (FULL, [4] * 5, 5)
    assert list(clean.inner) == [5, 6, 7] and clean.ends == [4, 8]
    noisy = image_segment(start=9, rope=5, num_tokens=2, noisy=True)
    assert (noisy.attn_mode, noisy.next_rope, list(noisy.inner)) == (NOISE, 5, [10, 11])
    assert dropped_rope(5, is_image=True) == 6 and dropped_rope(5, is_image=False) == 5
