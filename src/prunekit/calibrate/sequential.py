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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from prunekit.calibrate.stats import run_model


class _StopForward(Exception):
    pass


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


def _without_cache(model: nn.Module, sample: Any) -> Any:
    if isinstance(sample, dict) and hasattr(model, "config") and "use_cache" not in sample:
        if getattr(model.config, "use_cache", None) is not None:
            return {**sample, "use_cache": False}
    return sample


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, data: Iterable[Any]) -> list:
    """The (args, kwargs) the model passes to ``blocks[0]`` for every sample of ``data``."""
    store: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, store)
    try:
        for sample in data:
            try:
                run_model(model, _without_cache(model, sample))
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


def call_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run one block and return its hidden-state output (first element of a tuple output)."""
    out = block(*args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{type(block).__name__} returned {type(out).__name__}; expected a tensor or a tuple"
        )
    return out


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
) -> None:
    """Visit every block with its calibration inputs.

    ``on_block(index, block, run)`` is called for each block; ``run()`` feeds the block every
    captured input (call it inside the statistics hooks), after which the callback may change
    the block's weights. The next block's inputs are the block's outputs after the callback
    (``propagate="pruned"``) or from the first ``run()`` (``"dense"``).
    """
    if propagate not in ("pruned", "dense"):
        raise ValueError(f"propagate must be 'pruned' or 'dense', got {propagate!r}")
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, blocks, data)
        indices = range(len(blocks))
        for index in progress(indices) if progress else indices:
            block = blocks[index]
            home = next(block.parameters(), torch.empty(0)).device
            if device is not None:
                block.to(device)
            outputs: list[torch.Tensor] = []

            def run(
                block: nn.Module = block, outputs: list = outputs, inputs: list = inputs
            ) -> None:
                outputs.clear()
                for args, kwargs in inputs:
                    home_device = _hidden(args, kwargs).device
                    moved_args, moved_kwargs = to_device((args, kwargs), device)
                    outputs.append(call_block(block, moved_args, moved_kwargs).to(home_device))

            on_block(index, block, run)
            if not outputs:
                run()
            elif propagate == "pruned":
                run()
            inputs = [
                _with_hidden(args, kwargs, out)
                for (args, kwargs), out in zip(inputs, outputs, strict=True)
            ]
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)
