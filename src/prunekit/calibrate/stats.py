"""Statistics of the inputs that each targeted layer sees, gathered with forward pre-hooks.

* ``"norm"``: the sum of squares of every input feature over all calibration tokens (Wanda's
  ||X_j||^2, OWL's outlier scores).
* ``"hessian"``: H = 2/n * sum(x x^T) over the n calibration tokens (SparseGPT's layer Hessian).
  Each sample's ``x^T x`` is computed in float32 and added into a float64 sum, and H is cast to
  float32 when the context closes: the float32 products have at most 48 significant bits, so
  the float64 sum is (nearly always) exact and H does not depend on how the samples were split
  or in which order they were added; under ``torch.distributed`` the ranks' sums give the same H
  as one process (:mod:`prunekit.distributed.reduce`). The sum costs float64 memory (twice the
  float32 Hessian) while the statistics are gathered. A sample's product is computed in column
  blocks of :data:`HESSIAN_BLOCK`: only the blocks on and above the diagonal are multiplied and
  summed (about half the work and half the float64 additions of a whole ``x^T x``), and the
  blocks below are mirrored from them once, when the context closes (:func:`sample_products`).

Linear and Hugging Face ``Conv1D`` inputs are read as (tokens, in_features); Conv1d / Conv2d
(``groups=1``) inputs are unfolded into (positions, in_channels * kernel) so that the features
line up with the flattened weight, exactly as the convolution multiplies them.

Batched calls: the sequential runner feeds several calibration samples through a block at once
and says how many rows of dim 0 each sample holds (:func:`samples_in_call`). The statistics are
still those of one sample at a time, with the same bits: the per-sample sums of squares are
folded in sample order, and the per-sample float32 ``x^T x`` products are folded into a float64
sum of the call, which is added to each layer's total. Layers that read the same input tensor (a Llama block's q / k / v
projections, gate / up) share one computation of it.

Under ``torch.autocast`` (``oneshot(calibration_dtype="bfloat16")``,
:mod:`prunekit.calibrate.precision`) the statistics are computed with autocast switched off, from
the inputs cast up to float32: the same float32 products and float64 sums as without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.calibrate.precision import no_autocast
from prunekit.targets import Target

_SAMPLES: ContextVar[tuple[int, ...] | None] = ContextVar("prunekit_samples", default=None)

HESSIAN_BLOCK = 96
"""Width of the column blocks in which each sample's ``x^T x`` is computed (see the module doc):
narrow enough that about half the products are skipped, wide enough for fast matrix products."""


Products = list[tuple[int, torch.Tensor]]
"""The blocks on and above the diagonal of a float64 x^T x sum: (first column of the block,
its rows ``[start, start + b)`` x columns ``[start, width)``)."""


def upper_products(samples: torch.Tensor, block: int = HESSIAN_BLOCK) -> Products:
    """The float64 sum over ``samples`` (samples, rows, in) of each sample's float32 ``x^T x``,
    as its column blocks of ``block`` on and above the diagonal (:data:`Products`); the blocks
    below are never computed (:func:`mirror_lower_` fills them in a whole sum)."""
    width = samples.shape[-1]
    blocks = []
    for start in range(0, width, block):
        end = min(start + block, width)
        products = torch.bmm(samples[:, :, start:end].transpose(1, 2), samples[:, :, start:])
        # each float32 product converted and summed in float64 (exact, so in any order)
        blocks.append((start, products.sum(0, dtype=torch.float64)))
    return blocks


def add_products_(total: torch.Tensor, blocks: Products) -> torch.Tensor:
    """Add :func:`upper_products` blocks into a float64 (in x in) sum, in place."""
    for start, part in blocks:
        total[start : start + part.shape[0], start:].add_(part)
    return total


def sample_products(samples: torch.Tensor, block: int = HESSIAN_BLOCK) -> torch.Tensor:
    """The float64 sum over ``samples`` (samples, rows, in) of each sample's float32 ``x^T x``,
    computed in column blocks of ``block``: only the blocks on and above the diagonal; those
    below are left zero (:func:`mirror_lower_` fills them). A sample's product has the same bits
    whatever other samples are passed with it, and the float64 sum is exact (module doc).

    Example:
        >>> x = torch.randn(3, 10, 5)
        >>> full = mirror_lower_(sample_products(x, block=2), block=2)
        >>> torch.allclose(full, sum(p.t().double() @ p.double() for p in x), atol=1e-4)
        True
    """
    width = samples.shape[-1]
    total = torch.zeros(width, width, dtype=torch.float64, device=samples.device)
    return add_products_(total, upper_products(samples, block))


def mirror_lower_(total: torch.Tensor, block: int = HESSIAN_BLOCK) -> torch.Tensor:
    """Fill the blocks below the diagonal of a :func:`sample_products` sum from those above
    (in place; returns ``total``)."""
    width = total.shape[0]
    for start in range(0, width, block):
        end = min(start + block, width)
        total[end:, start:end] = total[start:end, end:].t()
    return total


@contextmanager
def samples_in_call(sizes: tuple[int, ...]) -> Iterator[None]:
    """Within this block, each forward call holds ``len(sizes)`` calibration samples stacked
    along dim 0 (``sizes[i]`` rows of dim 0 each); :class:`InputStats` then accumulates them
    one sample at a time, as if each had run alone."""
    token = _SAMPLES.set(tuple(sizes))
    try:
        yield
    finally:
        _SAMPLES.reset(token)


def check_calibratable(target: Target) -> None:
    """Raise a clear error for layers whose inputs cannot be read as feature rows."""
    module = target.module
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise ValueError(
                f"{target.module_name}: calibrated methods read conv inputs with unfold, which "
                "needs groups=1, numeric padding and padding_mode='zeros'; ignore this layer "
                "(ignore=[...]) or prune it with method='magnitude'"
            )
    elif isinstance(module, nn.Conv3d):
        raise ValueError(
            f"{target.module_name}: calibrated methods support Linear, HF Conv1D and "
            "Conv1d/Conv2d layers, not Conv3d; ignore it or use method='magnitude'"
        )


def input_rows(target: Target, x: torch.Tensor) -> torch.Tensor:
    """The layer input as a (rows, in_features) matrix matching the (out, in) weight view."""
    module = target.module
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)
        cols = F.unfold(
            x,
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, module.padding[0]),
            stride=(1, module.stride[0]),
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class InputStats:
    """Context manager that accumulates input statistics of ``targets`` while the model runs.

    Example:
        >>> with InputStats(targets, need={"norm"}) as collected:  # doctest: +SKIP
        ...     model(batch)
        >>> collected.stats["fc1.weight"]["norm"]                  # doctest: +SKIP
    """

    def __init__(self, targets: list[Target], need: set[str], keep_parts: bool = False) -> None:
        unknown = set(need) - {"norm", "hessian"}
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; accepted: norm, hessian")
        for t in targets:
            check_calibratable(t)
        self.targets = targets
        self.need = set(need)
        self.stats: dict[str, dict[str, torch.Tensor]] = {t.name: {} for t in targets}
        self.rows: dict[str, int] = {t.name: 0 for t in targets}
        # keep_parts: every call's "norm" vector and the float64 Hessian sums after the block,
        # so that ranks can add them up as one process does (prunekit.distributed.reduce)
        self.keep_parts = keep_parts
        self.norm_parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
        # float64 sum of x^T x (see module doc): the blocks above the diagonal while gathering,
        # the whole matrix once the context has closed
        self.hessian_sums: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._memo: tuple | None = None  # (input tensor, kind, measured, first reader)
        # each target's first reader of its input in every call so far (itself when not shared)
        self._leader: dict[str, str] = {}

    def _hook(self, target: Target):
        def record(module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            key = (x._version, "conv" if isinstance(module, (nn.Conv1d, nn.Conv2d)) else "rows")
            memo = self._memo
            if memo is None or memo[0] is not x or memo[1] != key or key[1] == "conv":
                # a new input tensor (or a convolution, whose unfolding is per layer); measured
                # with autocast off (a reduced-precision calibration forward may run under it)
                with no_autocast(x.device):
                    memo = (x, key, self._measure(target, x.detach()), target.name)
                self._memo = memo
            if self._leader.setdefault(target.name, memo[3]) != memo[3]:
                self._leader[target.name] = target.name  # shared in some calls only: its own
            rows, squares, product = memo[2]
            entry = self.stats[target.name]
            if "norm" in self.need:
                for sq in squares:  # one sample at a time, in order: the bits of one by one
                    entry["norm"] = entry["norm"] + sq if "norm" in entry else sq
                    if self.keep_parts:
                        self.norm_parts[target.name].append(sq)
            if "hessian" in self.need:
                total = self.hessian_sums.get(target.name)
                if total is None:
                    width = product[0][1].shape[1] if product else 0  # the first block: all columns
                    total = x.new_zeros((width, width), dtype=torch.float64)
                    self.hessian_sums[target.name] = total
                add_products_(total, product)
            self.rows[target.name] += rows

        return record

    def _measure(self, target: Target, x: torch.Tensor) -> tuple[int, list, Products | None]:
        """(rows, per-sample sums of squares, float64 sum of the per-sample x^T x as
        :func:`upper_products` blocks) of one call's input ``x``, which holds the samples of
        :func:`samples_in_call` (or one)."""
        sizes = _SAMPLES.get()
        if sizes is None or len(sizes) < 2 or sum(sizes) != x.shape[0]:
            sizes = (x.shape[0],)
        if len(set(sizes)) == 1 and not isinstance(target.module, (nn.Conv1d, nn.Conv2d)):
            samples = x.float().reshape(len(sizes), -1, x.shape[-1])  # (samples, rows, in)
        else:
            parts = [input_rows(target, part).float() for part in x.split(list(sizes))]
            if len({p.shape[0] for p in parts}) == 1:
                samples = torch.stack(parts)
            else:  # samples of different lengths: one by one
                return self._measure_each(parts)
        rows = samples.shape[0] * samples.shape[1]
        squares = list(samples.pow(2).sum(1)) if "norm" in self.need else []
        product = upper_products(samples) if "hessian" in self.need else None
        return rows, squares, product

    def _measure_each(self, parts: list[torch.Tensor]) -> tuple[int, list, Products | None]:
        rows = sum(p.shape[0] for p in parts)
        squares = [p.pow(2).sum(0) for p in parts] if "norm" in self.need else []
        product = None
        if "hessian" in self.need:
            for p in parts:  # each sample's product, added into the float64 sum
                one = upper_products(p[None])
                if product is None:
                    product = one
                else:
                    for (_, mine), (_, theirs) in zip(product, one, strict=True):
                        mine.add_(theirs)
        return rows, squares, product

    def input_groups(self) -> list[list[str]]:
        """Names of the targets that read one input tensor in every call (a Llama block's
        q / k / v, gate / up), in target order; a target whose input is its own is alone.

        Example:
            >>> with InputStats(targets, need={"hessian"}) as collected:  # doctest: +SKIP
            ...     block(x)
            >>> collected.input_groups()                                 # doctest: +SKIP
            [['q_proj.weight', 'k_proj.weight', 'v_proj.weight'], ['o_proj.weight'], ...]
        """
        groups: dict[str, list[str]] = {}
        for t in self.targets:
            leader = self._leader.get(t.name, t.name)
            if self._leader.get(leader, leader) != leader:  # its leader joined another group
                leader = t.name
            groups.setdefault(leader, []).append(t.name)
        return list(groups.values())

    def __enter__(self) -> InputStats:
        for t in self.targets:
            # a pre-hook: the inputs are measured before the layer runs, so that a caller may stop
            # the forward pass there (prunekit.calibrate.sequential, run(until=...))
            self._handles.append(t.module.register_forward_pre_hook(self._hook(t)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._memo = None
        for name, total in self.hessian_sums.items():
            mirror_lower_(total)  # the sums were gathered above the diagonal only
            self.stats[name]["hessian"] = hessian_from_sum(total, self.rows[name])
        if not self.keep_parts:  # nobody sums them over ranks: free the float64 copies
            self.hessian_sums = {}


def hessian_from_sum(total: torch.Tensor, rows: int) -> torch.Tensor:
    """SparseGPT's float32 H = 2/n * sum(x x^T) from the float64 sum of ``rows`` rows."""
    return (total * (2.0 / rows)).float()


def to_device(obj: Any, device: torch.device | str | None) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to ``device``."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def input_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (its embedding, for a language model): where
    a calibration sample must be for the model to take it. None for a model without parameters."""
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":  # a skeleton: its parts load elsewhere
        return None
    return first.device


def run_model(model: nn.Module, sample: Any) -> Any:
    """Call the model on one sample: a dict of keyword arguments, a tuple, or a tensor, moved
    to the model's :func:`input_device` first (calibration sets are built on the CPU)."""
    sample = to_device(sample, input_device(model))
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    targets: list[Target],
    data: Iterable[Any],
    need: set[str],
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``model`` over ``data`` (eval mode) and return the statistics of every target."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    try:
        with InputStats(targets, need) as collected:
            for i, sample in enumerate(
                tqdm(data, desc="calibration", disable=not progress, leave=False)
            ):
                if max_batches is not None and i >= max_batches:
                    break
                run_model(model, sample)
    finally:
        model.train(was_training)
    missing = [name for name, n in collected.rows.items() if n == 0]
    if missing:
        raise ValueError(f"these layers never ran on the calibration data: {', '.join(missing)}")
    return collected.stats


@torch.no_grad()
def check_targets_run(model: nn.Module, targets: list[Target], sample: Any) -> None:
    """Run one calibration sample and raise, naming them, if some targets never execute.

    Called before any weight changes, so a layer the calibration data cannot reach stops the
    job up front instead of after the blocks before it were pruned.
    """
    ran: set[str] = set()
    handles = [
        t.module.register_forward_hook(lambda *_, name=t.name: ran.add(name)) for t in targets
    ]
    was_training = model.training
    model.eval()
    try:
        run_model(model, sample)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [t.name for t in targets if t.name not in ran]
    if missing:
        raise ValueError(
            f"these targeted layers never run on the calibration data: {', '.join(missing)}; "
            "ignore them (ignore=[...]) or calibrate with inputs that reach them"
        )
