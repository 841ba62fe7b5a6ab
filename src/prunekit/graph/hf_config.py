"""Why a pruned Hugging Face folder is, or is not, loadable by plain ``from_pretrained``: the
shapes its ``config.json`` builds compared with the tensors it holds, without loading weights.

``AutoModel.from_pretrained`` builds the architecture from ``config.json`` alone, so it loads a
structurally pruned folder only when the config can say every new width: one MLP width for all
layers (``intermediate_size``), head counts (Llama-style ``num_attention_heads`` /
``num_key_value_heads`` / ``head_dim``), and a hidden size the config's own checks accept.
Per-layer widths (a MAC target met layer by layer), BERT heads (head size = hidden / heads) and a
hidden size that is not a multiple of the head count cannot be said; then only
``prunekit.from_pretrained`` rebuilds the model (from the surgery record in ``prunekit.json``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def plain_mismatch(folder: str | os.PathLike) -> str | None:
    """The first tensor whose shape differs between what ``config.json`` builds and what the
    folder's safetensors hold, as one phrase; None when every shape agrees (or the folder holds
    no plain safetensors weights to compare).

    Example:
        >>> plain_mismatch("out/small")  # doctest: +SKIP
        'model.layers.0.mlp.up_proj.weight: config.json builds 64x32, the folder holds 50x27'
    """
    import transformers

    from prunekit.compress.validate import read_header

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files or not (folder / "config.json").is_file():
        return None
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    cls = None
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) or cls
    with torch.device("meta"):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for file in files:
        for key, info in read_header(file).items():
            want = expected.get(key)
            if want is not None and want != tuple(info.shape):
                shown = "x".join(map(str, want)), "x".join(map(str, info.shape))
                return f"{key}: config.json builds {shown[0]}, the folder holds {shown[1]}"
    return None
