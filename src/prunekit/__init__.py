"""prunekit: make trained PyTorch models smaller and faster by pruning them.

The public verbs:

>>> import torch, prunekit
>>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> report = prunekit.prune(net, sparsity=0.5, scope="global")  # masks, on a copy
>>> pruned = prunekit.finalize(report.model)                      # plain nn.Sequential again
>>> round(prunekit.stats(pruned).layer("0").sparsity, 2)
0.5

Structured pruning (``prune_structured``, ``count``), calibrated one-shot pruning
(``oneshot``, ``calibration``), train-time pruning (``GradualPruner``, ``finetune``,
``lottery_ticket``, ``prune_at_init``) and evaluation (``eval``) build on the same pieces;
``compress(model, recipe, ...)`` runs a whole recipe of them, measured stage by stage.
"""

from prunekit import compress, eval, recipes, train
from prunekit._version import __version__
from prunekit.analysis import (
    Allocation,
    FloorSearchReport,
    SensitivityResult,
    allocate,
    prune_to_floor,
    sensitivity,
)
from prunekit.calibrate import calibration
from prunekit.calibrate.oneshot import oneshot
from prunekit.compress.io import load, save
from prunekit.compress.onnx_export import OnnxCheckError, OnnxExport, export_onnx
from prunekit.compress.quantize import QuantizeReport, quantize
from prunekit.compress.validate import SavedModelError
from prunekit.graph import (
    CountReport,
    StructuredPruningError,
    StructuredReport,
    UnsupportedOperationError,
    count,
    from_pretrained,
    prune_structured,
    save_pretrained,
)
from prunekit.masks import finalize
from prunekit.prune import prune
from prunekit.recipes import CompressReport, RecipeError, list_recipes, load_recipe
from prunekit.report import PruneReport, SparsityReport, stats
from prunekit.runtime.accelerate import AccelerateReport, accelerate, deaccelerate
from prunekit.runtime.accelerated import AcceleratedModelError
from prunekit.runtime.bench import BenchReport, bench
from prunekit.train import GradualPruner, finetune, lottery_ticket, prune_at_init

__all__ = [
    "AccelerateReport",
    "AcceleratedModelError",
    "Allocation",
    "BenchReport",
    "CompressReport",
    "CountReport",
    "FloorSearchReport",
    "GradualPruner",
    "OnnxCheckError",
    "OnnxExport",
    "PruneReport",
    "QuantizeReport",
    "RecipeError",
    "SavedModelError",
    "SensitivityResult",
    "SparsityReport",
    "StructuredPruningError",
    "StructuredReport",
    "UnsupportedOperationError",
    "__version__",
    "accelerate",
    "allocate",
    "bench",
    "calibration",
    "compress",
    "count",
    "deaccelerate",
    "eval",
    "export_onnx",
    "finalize",
    "finetune",
    "from_pretrained",
    "list_recipes",
    "load",
    "load_recipe",
    "lottery_ticket",
    "oneshot",
    "prune",
    "prune_at_init",
    "prune_structured",
    "prune_to_floor",
    "quantize",
    "recipes",
    "save",
    "save_pretrained",
    "sensitivity",
    "stats",
    "train",
]
