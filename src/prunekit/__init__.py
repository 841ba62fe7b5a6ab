"""prunekit: make trained PyTorch models smaller and faster by pruning them.

The public verbs:

>>> import torch, prunekit
>>> net = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
>>> report = prunekit.prune(net, sparsity=0.5, scope="global")  # masks, on a copy
>>> pruned = prunekit.finalize(report.model)                      # plain nn.Sequential again
>>> round(prunekit.stats(pruned).layer("0").sparsity, 2)
0.5
"""

from prunekit import eval
from prunekit._version import __version__
from prunekit.calibrate import calibration
from prunekit.compress.io import load, save
from prunekit.masks import finalize
from prunekit.oneshot import oneshot
from prunekit.prune import prune
from prunekit.report import PruneReport, SparsityReport, stats

__all__ = [
    "PruneReport",
    "SparsityReport",
    "__version__",
    "calibration",
    "eval",
    "finalize",
    "load",
    "oneshot",
    "prune",
    "save",
    "stats",
]
