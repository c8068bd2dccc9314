"""A miniature of the BAGEL-7B-MoT release directory, for export and loading tests.

Like the release: bf16 `ema.safetensors` (incl. the sin-cos tables), float32 `ae.safetensors`, configs written by
someone else's tool (extra keys, another formatting, so a re-save would change their bytes), a Qwen2 BPE tokenizer
saved as the official app reads it (`vocab.json` + `merges.txt` for the slow `Qwen2Tokenizer`, plus
`tokenizer.json` / `tokenizer_config.json`), and files we know nothing about (README, config.json,
generation_config.json, .gitattributes, a folder). The model is the tiny preset; the tokenizer (~300 ids) fits
its 320 embedding rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bagel_ft.autoencoder import AutoEncoder
from bagel_ft.config import BagelConfig
from bagel_ft.modeling import Bagel

TEXTS = [
    "a red circle to the left of a blue square",
    "draw a green triangle above the yellow circle",
    "<ins>add a purple square</ins><des>a purple square in the middle</des>",
    "the image shows two shapes; refine the blue one",
]
OTHER_FILES = {
    "README.md": "# BAGEL-7B-MoT (miniature)\n\nWeights for tests.\n",
    "config.json": '{"architectures": ["Bagel"], "model_type": "bagel"}\n',
    "generation_config.json": '{\n  "do_sample": false\n}\n',
    ".gitattributes": "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    "assets/teaser.txt": "an image would be here\n",
}


def save_qwen2_tokenizer(path: Path) -> None:
    """A small Qwen2 byte-level BPE, saved with vocab.json / merges.txt (BPE tokens only, as the release's) and the
    stream's special tokens added after the vocabulary."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from bagel_ft.tokenizer import QWEN25_ADDED_TOKENS, train_bpe_tokenizer

    bpe = train_bpe_tokenizer(TEXTS * 10, vocab_size=300).hf.backend_tokenizer.model
    bpe.save(str(path))  # vocab.json, merges.txt
    vocab = json.loads((path / "vocab.json").read_text())
    vocab = {token: i for i, token in enumerate(t for t in vocab if not t.startswith("<|"))}
    merges = [tuple(line.split()) for line in (path / "merges.txt").read_text().splitlines()[1:] if line]
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    specials = [AddedToken(t, special=True, normalized=False) for t, _ in QWEN25_ADDED_TOKENS[:11]]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.save_pretrained(str(path))  # tokenizer.json, tokenizer_config.json
    tok.backend_tokenizer.model.save(str(path))  # vocab.json / merges.txt of the final tokenizer


def make_release_dir(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    cfg = BagelConfig.preset("tiny")
    Bagel(cfg).attach_vae(AutoEncoder(cfg.vae)).save_pretrained(path, dtype=torch.bfloat16)
    llm = json.loads((path / "llm_config.json").read_text())
    llm.update(_name_or_path="Qwen/Qwen2.5-7B-Instruct", torch_dtype="bfloat16", transformers_version="4.43.1")
    (path / "llm_config.json").write_text(json.dumps(llm, indent=2, sort_keys=True))  # no trailing newline
    save_qwen2_tokenizer(path)
    for name, text in OTHER_FILES.items():
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text(text)
    return path
