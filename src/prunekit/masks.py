"""Masks that survive ``deepcopy``, ``pickle``, ``torch.save(model)``, ``state_dict`` and ``torch.compile``.

How it works: masking parameter ``weight`` of a module swaps the module's class for a small
subclass (``MaskedLinear`` for ``nn.Linear`` and so on) whose ``weight`` is a property returning
``raw * mask``. The raw tensor stays a normal ``nn.Parameter`` under its own name, so
``state_dict()`` keeps the key ``weight`` (plus a 0/1 buffer ``weight_mask`` in the weight's
dtype: multiplying by it is twice as fast as by a bool mask) and optimisers see the same
parameter object. Because the mask multiplies the weight inside the forward pass, the gradient
of every masked entry is exactly zero, and the raw values at masked positions are set to zero
when the mask is applied; SGD (with momentum), Adam and AdamW started after masking therefore
never move them. Optimiser state from before the mask (momentum) can move a raw value, but the
effective weight stays zero regardless, :func:`finalize` bakes the mask in, and
:func:`reapply_masks` re-zeroes the raw values.

One consequence to know: on a masked module ``module.weight`` is a computed tensor, not the
parameter. Read gradients, re-initialise or edit weights through ``raw_parameter(module)`` (or
``model.parameters()``); ``module.weight.grad`` is None and ``module.weight.data.fill_()``
changes nothing.

Unlike ``torch.nn.utils.prune`` there are no forward pre-hooks and no ``weight_orig`` keys, and
unlike ``torch.nn.utils.parametrize`` the module pickles: the subclass rebuilds itself on
unpickling from its base class and the masked names (see ``_rebuild_masked_module``).

Example:
    >>> import torch, prunekit
    >>> layer = torch.nn.Linear(4, 2)
    >>> prunekit.masks.apply_mask(layer, "weight", torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]]).bool())
    >>> int((layer.weight == 0).sum())
    4
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.runtime.accelerated import decode_accelerated
from prunekit.runtime.copies import copy_model

MASK_SUFFIX = "_mask"

_CLASS_CACHE: dict[tuple[type, tuple[str, ...]], type] = {}


class MaskedModule:
    """Marker base of every masked module class; holds the pickling logic."""

    _prunekit_base: type
    _prunekit_masked: tuple[str, ...]

    def __reduce_ex__(self, protocol):  # noqa: D105 - pickle protocol
        return (
            _rebuild_masked_module,
            (self._prunekit_base, self._prunekit_masked),
            self.__getstate__(),
        )


def _rebuild_masked_module(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = _masked_class(base, names)
    return cls.__new__(cls)


def _masked_property(name: str) -> property:
    mask_name = name + MASK_SUFFIX

    def masked_weight(self: nn.Module) -> torch.Tensor:
        return self._parameters[name] * self._buffers[mask_name]

    masked_weight.__name__ = name
    return property(masked_weight, doc=f"``{name}`` with its pruning mask applied.")


def _masked_class(base: type, names: tuple[str, ...]) -> type:
    key = (base, names)
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        namespace = {name: _masked_property(name) for name in names}
        namespace["_prunekit_base"] = base
        namespace["_prunekit_masked"] = names
        namespace["__module__"] = base.__module__
        cls = type(f"Masked{base.__name__}", (MaskedModule, base), namespace)
        _CLASS_CACHE[key] = cls
    return cls


def is_masked(module: nn.Module, name: str | None = None) -> bool:
    """Whether ``module`` carries a prunekit mask (on ``name``, or on any parameter)."""
    if not isinstance(module, MaskedModule):
        return False
    return name is None or name in module._prunekit_masked


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """A bool copy of the keep-mask of ``module.<name>`` (True = kept), or None if unmasked."""
    if not is_masked(module, name):
        return None
    return module._buffers[name + MASK_SUFFIX] != 0


def raw_parameter(module: nn.Module, name: str = "weight") -> nn.Parameter:
    """The stored parameter behind ``module.<name>``, masked or not (what optimisers update)."""
    param = module._parameters.get(name)
    if param is None:
        raise KeyError(f"{type(module).__name__} has no parameter named {name!r}")
    return param


def apply_mask(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    """Mask ``module.<name>`` with ``keep`` (bool, True = kept), in place.

    A parameter that is already masked keeps its old zeros: the new mask is the logical AND of
    the old and the new one, so pruning again can only extend the set of zeros.
    """
    param = raw_parameter(module, name)
    if keep.shape != param.shape:
        raise ValueError(
            f"mask shape {tuple(keep.shape)} does not match {name!r} of shape {tuple(param.shape)}"
        )
    if parametrize.is_parametrized(module, name):
        raise TypeError(
            f"{type(module).__name__}.{name} already has a torch parametrization; prunekit masks "
            "cannot be stacked on it. Remove it first (parametrize.remove_parametrizations)."
        )
    keep = keep.to(device=param.device, dtype=torch.bool)
    mask_name = name + MASK_SUFFIX
    if is_masked(module, name):
        keep = keep & (module._buffers[mask_name] != 0)
    keep = keep.to(param.dtype)
    if is_masked(module, name):
        module._buffers[mask_name] = keep
    else:
        module.register_buffer(mask_name, keep)
        names = tuple(sorted(set(getattr(module, "_prunekit_masked", ())) | {name}))
        base = getattr(module, "_prunekit_base", type(module))
        module.__class__ = _masked_class(base, names)
    with torch.no_grad():
        param.masked_fill_(keep == 0, 0)  # not mul_: NaN * 0 is NaN, a pruned NaN must be 0


def remove_mask(module: nn.Module, name: str) -> None:
    """Bake the zeros of ``module.<name>`` into its parameter and drop its mask, in place."""
    if not is_masked(module, name):
        return
    keep = module._buffers.pop(name + MASK_SUFFIX)
    with torch.no_grad():
        module._parameters[name].masked_fill_(keep == 0, 0)
    remaining = tuple(n for n in module._prunekit_masked if n != name)
    base = module._prunekit_base
    module.__class__ = _masked_class(base, remaining) if remaining else base


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(module_name, module, parameter_name)`` for every masked parameter in ``model``."""
    for module_name, module in model.named_modules():
        if isinstance(module, MaskedModule):
            for name in module._prunekit_masked:
                yield module_name, module, name


def finalize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Bake every mask into its weights and remove the mask machinery.

    The result is an instance of the plain architecture: its ``state_dict`` loads into a fresh,
    never-pruned model of the same class, with the zeros in place. Layers swapped in by
    :func:`prunekit.accelerate` are decoded back to their ``nn.Linear`` / ``nn.Conv2d`` too
    (as :func:`prunekit.deaccelerate` does). Returns a new model unless ``inplace=True``.

    Example:
        >>> import torch, prunekit
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> dense = prunekit.finalize(prunekit.prune(net, 0.5, scope="local").model)
        >>> type(dense[0]).__name__
        'Linear'
    """
    if not inplace:
        model = copy_model(model, "finalize")
    model = decode_accelerated(model)  # sparse-kernel layers back to their dense modules
    for _, module, name in list(masked_parameters(model)):
        remove_mask(module, name)
    return model


def reapply_masks(model: nn.Module) -> None:
    """Zero every masked raw parameter again.

    Masked entries receive zero gradient, so this is only needed after code that writes the raw
    parameters directly, or after steps of an optimiser whose momentum predates the mask.
    """
    with torch.no_grad():
        for _, module, name in masked_parameters(model):
            module._parameters[name].masked_fill_(module._buffers[name + MASK_SUFFIX] == 0, 0)
