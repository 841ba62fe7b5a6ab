"""Tiny Hugging Face model folders for the command-line tests: a BERT encoder (with
sentence-transformers' module files) and a Llama causal LM, each with a word-level tokenizer
and a calibration text it tokenizes fully. Built from configs; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(60)]


def word_tokenizer(transformers, bert: bool):
    """A fast word-level tokenizer over ``WORDS`` (ids 0..63 with the special tokens)."""
    import tokenizers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({w: i + len(specials) for i, w in enumerate(WORDS)})
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    extra = {"cls_token": "[CLS]", "sep_token": "[SEP]"} if bert else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", **extra
    )


def llama_with_plain_tokenizer(llama_dir: Path, dest: Path, n_words: int) -> tuple[Path, Path]:
    """A copy of the tiny Llama folder ``llama_dir`` at ``dest / "with-tok"`` with a word-level
    tokenizer over ``WORDS`` (``[UNK]`` 0, then the words), and a calibration text of
    ``n_words`` of them (seed 0) at ``dest / "calib.txt"``: (folder, text file)."""
    import shutil

    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    folder = dest / "with-tok"
    shutil.copytree(llama_dir, folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    fast.save_pretrained(folder)
    calib = dest / "calib.txt"
    calib.write_text(text(n_words))
    return folder, calib


def text(n_words: int = 4000, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g))


def bert_folder(transformers, folder: Path) -> Path:
    """A 2-layer BERT (hidden 32, 4 heads, MLP 64) laid out as a sentence-transformers model."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).eval().save_pretrained(folder)
    word_tokenizer(transformers, bert=True).save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    (folder / "README.md").write_text("# tiny bert\n")
    (folder / "onnx").mkdir()  # a stale export of the dense model: never copied
    (folder / "onnx" / "model.onnx").write_bytes(b"stale")
    return folder


def llama_folder(transformers, folder: Path) -> Path:
    """conftest's 2-layer Llama with grouped-query attention (4 q heads, 2 kv heads)."""
    from conftest import tiny_llama

    tiny_llama().save_pretrained(folder)
    word_tokenizer(transformers, bert=False).save_pretrained(folder)
    return folder
