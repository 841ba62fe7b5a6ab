"""The files of a model folder besides its weights, copied into every folder prunekit writes from
it: tokenizer, generation config, README, and sentence-transformers' modules (``modules.json``,
``config_sentence_transformers.json``, ``1_Pooling/``, ``2_Normalize/`` ...), so that
``SentenceTransformer(out)`` and ``AutoTokenizer.from_pretrained(out)`` work on the output.

Weight files of the source (``*.safetensors``, pickles, their indexes) are never copied: the
writer writes its own. Sub-folders are copied only when ``modules.json`` names them (a
sentence-transformers module); other sub-folders (``onnx/``, ``openvino/``, checkpoints) hold
stale copies of the unpruned model and are left out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def is_weight_file(path: Path) -> bool:
    """A weights file (or its index), which a writer replaces rather than copies."""
    return path.suffix in WEIGHT_SUFFIXES or path.name.endswith(WEIGHT_INDEX_SUFFIXES)


def module_folders(source: Path) -> list[str]:
    """Sub-folders that ``modules.json`` (sentence-transformers) names, e.g. ``["1_Pooling"]``.
    A missing or unreadable ``modules.json`` names none."""
    try:
        modules = json.loads((source / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = []
    for entry in modules if isinstance(modules, list) else []:
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str) and path and Path(path).name == path and path not in (".", ".."):
            names.append(path)
    return names


def copy_side_files(source: str | Path, folder: str | Path) -> list[str]:
    """Copy ``source``'s non-weight files and sentence-transformers module folders into
    ``folder``, leaving what ``folder`` already holds; return the names copied.

    Example:
        >>> copy_side_files("models/minilm", "out/pruned")  # doctest: +SKIP
        ['1_Pooling', 'README.md', 'modules.json', 'tokenizer.json', ...]
    """
    source, folder = Path(source), Path(folder)
    copied = []
    for item in sorted(source.iterdir()):
        target = folder / item.name
        if target.exists() or item.name.startswith(".") or item.is_symlink():
            continue
        if item.is_file() and not is_weight_file(item):
            shutil.copy2(item, target)
            copied.append(item.name)
    for name in module_folders(source):
        item, target = source / name, folder / name
        if item.is_dir() and not item.is_symlink() and not target.exists():
            shutil.copytree(item, target, symlinks=False)
            copied.append(name)
    return sorted(copied)
