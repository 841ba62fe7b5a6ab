"""Run a model one block at a time over calibration data.

The blocks are the repeated layers of the model (a ``ModuleList`` such as ``model.layers`` of a
Llama, ``transformer.h`` of GPT-2, ``encoder.layer`` of BERT), found automatically as the
``ModuleList`` holding the most parameters, or named by the user. The runner

1. captures what the model passes to its first block for every calibration sample (the
   positional and keyword arguments: hidden states, attention masks, rotary embeddings...) by
   stopping the forward pass there;
2. for each block in turn: runs it on the captured inputs (statistics hooks see its layers),
   lets the caller prune it, and, by default, runs it again so the next block sees the outputs
   of the *pruned* block (``propagate="pruned"``, the protocol of SparseGPT and Wanda) or keeps
   the dense outputs (``propagate="dense"``).

Only one block and the activations of the calibration set are live at a time; with ``device``
each block is moved there for its turn and back afterwards, so the rest of the model stays on
the CPU.

Speed: consecutive samples whose other block arguments agree (same rotary embeddings, masks...)
are stacked along dim 0 and run through the block together, in chunks of at most
``batch_tokens`` tokens (memory stays bounded); the statistics hooks still see them sample by
sample (:func:`prunekit.calibrate.stats.samples_in_call`). The outputs are those of one sample
per call bit for bit where the matrix products give a row the same bits whatever the row count
(the CPUs this project is tested on); elsewhere (an Intel Xeon with AMX, torch 2.11) they agree
up to float rounding. The default chunk depends on where
the block runs: on a CPU, as many tokens as keep one chunk's hidden states within
:data:`CPU_BATCH_BYTES` (1024 tokens of a 256-wide float32 model), so that the chunk's
activations stay in the core's caches (larger chunks ran a Llama block up to 3x slower per
token: the element-wise operations and the matrix products then stream from main memory); on
an accelerator :data:`BATCH_TOKENS`. Before the first block is run, one
stacked call is checked against the same samples run one at a time; if the outputs differ (a
model whose extra arguments do not broadcast over samples) or the call fails, the runner goes
back to one sample per call. While the block runs, masked layers whose pruned raw values are
zero (as :func:`prunekit.masks.apply_mask` leaves them) compute with their raw weight, which
then equals ``raw * mask`` bit for bit, instead of multiplying by the mask on every call. A
caller that needs only what some layers of the block see (the statistics of a block whose
outputs are recomputed after pruning) passes them as ``run(until=...)``: each call of the block
then stops as soon as all of them have been entered, so the layers after them (a Llama block's
``down_proj``) are not computed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prunekit.calibrate.precision import compute_autocast
from prunekit.calibrate.stats import input_device, run_model, samples_in_call, to_device
from prunekit.masks import MASK_SUFFIX, MaskedModule

BATCH_TOKENS = 8192
"""Default most tokens (rows of hidden states) run through a block in one call on an
accelerator."""

CPU_BATCH_BYTES = 1 << 20
"""On a CPU, the default chunk holds at most this many bytes of hidden states (at least one
sample)."""


class _StopForward(Exception):
    pass


class _StopBlock(BaseException):
    """Ends a block's call once the layers a caller needs have been entered (a BaseException,
    so that model code catching ``Exception`` cannot swallow it and run on)."""


class _Catcher(nn.Module):
    """Stands in for the first block: records its inputs, then stops the forward pass."""

    def __init__(self, block: nn.Module, store: list) -> None:
        super().__init__()
        self.block = block
        self.store = store

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.store.append((args, kwargs))
        raise _StopForward

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the named ``ModuleList`` / ``Sequential``, or the
    ``ModuleList`` with the most parameters. None when the model has none."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError as exc:
            raise ValueError(
                f"blocks={blocks!r}: no such submodule in {type(model).__name__}"
            ) from exc
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(
                f"blocks={blocks!r} is a {type(found).__name__}; it must name a non-empty "
                "nn.ModuleList or nn.Sequential of blocks"
            )
        return blocks, found
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = (name, module), params
    return best


def _takes_use_cache(model: nn.Module) -> bool:
    if getattr(getattr(model, "config", None), "use_cache", None) is None:
        return False
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _call_without_cache(model: nn.Module, sample: Any, takes_use_cache: bool) -> Any:
    """Run the model on one sample with ``use_cache=False`` where it takes that argument
    (``takes_use_cache``, from :func:`_takes_use_cache`), for a dict, a tuple or a bare tensor
    of input ids alike: a key / value cache built per sample is work thrown away, and each
    sample's own cache object reaches the blocks as an argument that differs between samples,
    so they could not be stacked into one call."""
    if not takes_use_cache or (isinstance(sample, dict) and "use_cache" in sample):
        return run_model(model, sample)
    sample = to_device(sample, input_device(model))
    if isinstance(sample, dict):
        return model(**sample, use_cache=False)
    if isinstance(sample, (tuple, list)):
        return model(*sample, use_cache=False)
    return model(sample, use_cache=False)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, data: Iterable[Any]) -> list:
    """The (args, kwargs) the model passes to ``blocks[0]`` for every sample of ``data``."""
    store: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, store)
    takes_use_cache = _takes_use_cache(model)
    try:
        for sample in data:
            try:
                _call_without_cache(model, sample, takes_use_cache)
            except _StopForward:
                pass
            else:
                raise ValueError(
                    "the model finished a forward pass without calling its first block"
                )
    finally:
        blocks[0] = first
    return store


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def call_block(
    block: nn.Module, args: tuple, kwargs: dict, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Run one block and return its hidden-state output (first element of a tuple output).

    ``compute_dtype`` (e.g. ``torch.bfloat16``): the block runs under ``torch.autocast`` to that
    dtype on the device of its hidden-state input, and its output is cast back to the dtype of
    that input (:mod:`prunekit.calibrate.precision`); None runs it as it is.
    """
    if compute_dtype is None:
        out = block(*args, **kwargs)
    else:
        hidden = _hidden(args, kwargs)
        with compute_autocast(compute_dtype, hidden.device):
            out = block(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{type(block).__name__} returned {type(out).__name__}; expected a tensor or a tuple"
        )
    if compute_dtype is not None and out.is_floating_point():
        out = out.to(hidden.dtype)
    return out


def _same(a: Any, b: Any) -> bool:
    """Whether two non-hidden block arguments are interchangeable (tensors: equal values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return (
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return a is b


def _stackable(first: tuple, other: tuple) -> bool:
    (a_args, a_kwargs), (b_args, b_kwargs) = first, other
    ha, hb = _hidden(a_args, a_kwargs), _hidden(b_args, b_kwargs)
    if ha.shape[1:] != hb.shape[1:] or ha.dtype != hb.dtype or ha.device != hb.device:
        return False
    if ha.dim() == 0 or len(a_args) != len(b_args):
        return False
    return _same(_with_hidden(a_args, a_kwargs, None), _with_hidden(b_args, b_kwargs, None))


def default_batch_tokens(
    inputs: list, device: torch.device | str | None, block: nn.Module | None = None
) -> int:
    """The default most tokens a stacked block call holds: on a CPU, as many as keep one call's
    hidden states within :data:`CPU_BATCH_BYTES`; elsewhere :data:`BATCH_TOKENS`. ``device`` is
    where the blocks run (default: where ``block``'s parameters are, else the inputs).

    Example:
        >>> x = torch.zeros(1, 128, 256)
        >>> default_batch_tokens([((x,), {})], "cpu"), default_batch_tokens([((x,), {})], "cuda")
        (1024, 8192)
    """
    if not inputs:
        return BATCH_TOKENS
    hidden = _hidden(*inputs[0])
    if device is None:
        param = next(block.parameters(), None) if block is not None else None
        device = param.device if param is not None else hidden.device
    if torch.device(device).type != "cpu" or hidden.dim() == 0:
        return BATCH_TOKENS
    row_bytes = max(1, hidden.shape[-1] * hidden.element_size())
    return max(1, CPU_BATCH_BYTES // row_bytes)


class _UntilEntered:
    """Forward pre-hooks that stop a block's call (:class:`_StopBlock`) once every module of
    ``modules`` has been entered in it. Armed only after a whole call in which each of them ran
    exactly once, so a module that runs twice, or not at all, never stops anything early."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list({id(m): m for m in modules}.values())
        self.entered: dict[int, int] = {}
        self.armed = False
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self.entered[id(module)] = self.entered.get(id(module), 0) + 1
        if self.armed and len(self.entered) == len(self.modules):
            raise _StopBlock

    def call(
        self,
        block: nn.Module,
        inputs: list,
        chunk: list[int],
        device: Any,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        """Run one chunk through ``block`` (outputs dropped), stopping early once armed."""
        self.entered = {}
        try:
            run_chunk(block, inputs, chunk, device, compute_dtype)
        except _StopBlock:
            return
        if not self.armed:
            counts = [self.entered.get(id(m), 0) for m in self.modules]
            self.armed = bool(counts) and all(c == 1 for c in counts)

    def __enter__(self) -> _UntilEntered:
        # appended after the hooks already registered (statistics): those run first
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def plan_chunks(inputs: list, batch_tokens: int) -> list[list[int]]:
    """Group consecutive samples that can run through a block in one call: their non-hidden
    arguments agree, and together they hold at most ``batch_tokens`` rows of hidden states
    (a sample alone may hold more). ``batch_tokens <= 0``: one sample per call.

    Example:
        >>> x = torch.zeros(1, 4, 8)
        >>> plan_chunks([((x,), {})] * 5, batch_tokens=8)
        [[0, 1], [2, 3], [4]]
    """
    chunks: list[list[int]] = []
    tokens = 0
    for i, (args, kwargs) in enumerate(inputs):
        hidden = _hidden(args, kwargs)
        size = hidden.numel() // max(1, hidden.shape[-1]) if hidden.dim() else 1
        if (
            chunks
            and batch_tokens > 0
            and tokens + size <= batch_tokens
            and _stackable(inputs[chunks[-1][0]], (args, kwargs))
        ):
            chunks[-1].append(i)
            tokens += size
        else:
            chunks.append([i])
            tokens = size
    return chunks


def run_chunk(
    block: nn.Module,
    inputs: list,
    chunk: list[int],
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Run the samples ``chunk`` of ``inputs`` through ``block`` in one call (stacked along
    dim 0) and return each sample's output on the device its input came from
    (``compute_dtype``: as in :func:`call_block`)."""
    args, kwargs = inputs[chunk[0]]
    home_device = _hidden(args, kwargs).device
    if len(chunk) == 1:
        moved_args, moved_kwargs = to_device((args, kwargs), device)
        return [call_block(block, moved_args, moved_kwargs, compute_dtype).to(home_device)]
    parts = [_hidden(*inputs[i]) for i in chunk]
    sizes = tuple(p.shape[0] for p in parts)
    stacked_args, stacked_kwargs = _with_hidden(args, kwargs, torch.cat(parts))
    moved_args, moved_kwargs = to_device((stacked_args, stacked_kwargs), device)
    with samples_in_call(sizes):
        out = call_block(block, moved_args, moved_kwargs, compute_dtype)
    if out.shape[0] != sum(sizes):
        raise ValueError(
            f"{type(block).__name__} returned {out.shape[0]} rows of dim 0 for {sum(sizes)} "
            "stacked samples"
        )
    return list(out.to(home_device).split(list(sizes)))


def _stacking_agrees(block: nn.Module, inputs: list, chunks: list, device: Any) -> bool:
    """Whether a stacked call gives the outputs of one call per sample (first two samples).

    Run in the block's own dtype (no autocast) whatever the calibration's compute dtype: the
    check asks whether the block's other arguments broadcast over stacked samples, which does
    not depend on the precision of its products, and float32's tolerance stays tight here where
    a bfloat16 run would differ by its own rounding (and fall back to one sample per call)."""
    first = next((c for c in chunks if len(c) > 1), None)
    if first is None:
        return True
    pair = first[:2]
    try:
        stacked = run_chunk(block, inputs, pair, device)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    for i, out in zip(pair, stacked, strict=True):
        alone = run_chunk(block, inputs, [i], device)[0]
        if alone.shape != out.shape or not torch.allclose(alone, out, rtol=1e-4, atol=1e-5):
            return False
    return True


@contextmanager
def plain_weights(block: nn.Module) -> Iterator[None]:
    """Within this block, masked layers whose raw parameters are already zero wherever the mask
    is (what :func:`prunekit.masks.apply_mask` leaves) run as their unmasked class: the raw
    weight then equals ``raw * mask`` bit for bit, and no call multiplies by the mask.
    Restored on exit, exceptions included."""
    swapped: list[tuple[nn.Module, type]] = []
    try:
        for module in block.modules():
            if not isinstance(module, MaskedModule):
                continue
            names = module._prunekit_masked
            if all(
                not module._parameters[n].masked_select(module._buffers[n + MASK_SUFFIX] == 0).any()
                for n in names
            ):
                swapped.append((module, type(module)))
                module.__class__ = module._prunekit_base
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    blocks: nn.ModuleList,
    data: Iterable[Any],
    on_block: Callable[[int, nn.Module, Callable[[], None]], None],
    *,
    propagate: str = "pruned",
    device: torch.device | str | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    batch_tokens: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Visit every block with its calibration inputs.

    ``on_block(index, block, run)`` is called for each block; ``run()`` feeds the block every
    captured input (call it inside the statistics hooks), after which the callback may change
    the block's weights. The next block's inputs are the block's outputs after the callback
    (``propagate="pruned"``) or from the first ``run()`` (``"dense"``). ``run(until=modules)``
    stops each call of the block once all of ``modules`` have been entered and keeps no
    outputs (the runner then runs the block again when its outputs are needed).
    ``batch_tokens``: the most tokens run through a block in one call (samples stacked; 0 runs
    one sample per call; default :func:`default_batch_tokens`); the outputs are the same as one
    sample per call (see the module docstring). ``compute_dtype`` (e.g. ``torch.bfloat16``):
    every block call runs under ``torch.autocast`` to it and its outputs are cast back to the
    dtype of the block's inputs (:mod:`prunekit.calibrate.precision`); None: as they are.
    """
    if propagate not in ("pruned", "dense"):
        raise ValueError(f"propagate must be 'pruned' or 'dense', got {propagate!r}")
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, blocks, data)
        if batch_tokens is None:
            batch_tokens = default_batch_tokens(inputs, device, blocks[0])
        chunks = plan_chunks(inputs, batch_tokens)
        checked = False
        indices = range(len(blocks))
        for index in progress(indices) if progress else indices:
            block = blocks[index]
            home = next(block.parameters(), torch.empty(0)).device
            if device is not None:
                block.to(device)
            if not checked:
                checked = True
                with plain_weights(block):
                    if not _stacking_agrees(block, inputs, chunks, device):
                        chunks = [[i] for i in range(len(inputs))]
            outputs: list[torch.Tensor] = []

            def run(
                until: Iterable[nn.Module] | None = None,
                block: nn.Module = block,
                outputs: list = outputs,
                inputs: list = inputs,
                chunks: list = chunks,
            ) -> None:
                outputs.clear()
                with plain_weights(block):
                    if until is not None:
                        with _UntilEntered(until) as stopper:
                            for chunk in chunks:
                                stopper.call(block, inputs, chunk, device, compute_dtype)
                        return
                    for chunk in chunks:
                        outputs.extend(run_chunk(block, inputs, chunk, device, compute_dtype))

            on_block(index, block, run)
            last = index == len(blocks) - 1  # nothing reads the last block's outputs
            if not last and (not outputs or propagate == "pruned"):
                run()
            if not last:
                inputs = [
                    _with_hidden(args, kwargs, out)
                    for (args, kwargs), out in zip(inputs, outputs, strict=True)
                ]
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
