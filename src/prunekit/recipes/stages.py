"""The stages a recipe may use: one public verb each, its checked keywords, what it needs, how the
pipeline calls it.

A stage's keywords are the verb's own keyword arguments. Types come from the verb's annotations
(validated with pydantic), ranges and choices from the constants the verb itself checks against,
so the recipe and the verb cannot drift apart. Arguments that carry data or code (the model,
calibration samples, the training batches, ``loss_fn``) are given to ``prunekit.compress`` once,
not written in the recipe.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from torch import nn

# Arguments the pipeline supplies itself; a recipe may not set them.
SUPPLIED = {
    "model",
    "example_inputs",
    "calib",
    "data",
    "loss_fn",
    "inplace",
    "progress",
    "path",
    "overwrite",
    "evaluate",
    "metadata",
}


def _sparsity(value: Any) -> None:
    if value is not None and not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value}")


def _fraction(value: Any) -> None:
    if value is not None and not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")


def _positive(value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be > 0, got {value}")


def _lr(value: Any) -> None:
    if value == "auto":  # finetune's learning-rate range test
        return
    if isinstance(value, str):
        raise ValueError(f"must be a positive number or 'auto', got {value!r}")
    _positive(value)


def _non_negative(value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def _at_least_one(value: Any) -> None:
    if value is not None and value < 1:
        raise ValueError(f"must be >= 1, got {value}")


def _choice(accepted: Callable[[], Iterable[str]]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        names = list(accepted())
        values = [value] if isinstance(value, str) else list(value or [])
        for item in values:
            if item not in names:
                raise ValueError(f"{item!r} is not one of {', '.join(map(repr, names))}")

    return check


def _pattern(value: Any) -> None:
    from prunekit.patterns import parse_pattern

    parse_pattern(value)


def _oneshot_pattern(value: Any) -> None:
    from prunekit.patterns import NM, Unstructured, parse_pattern

    if not isinstance(parse_pattern(value), Unstructured | NM):
        raise ValueError(f"oneshot takes 'unstructured' or 'N:M' (e.g. '2:4'), got {value!r}")


def _calibration_dtype(value: Any) -> None:
    """The names ``oneshot`` accepts, aliases included ("auto", "bf16", "FP32", null, ...)."""
    from prunekit.calibrate.precision import calibration_dtype_name

    calibration_dtype_name(value)  # ValueError naming what is accepted


def _sparsity_and_pattern(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """An N:M pattern fixes the sparsity (1 - N/M): ``prune`` and ``oneshot`` refuse another
    one when their stage comes up, and a searched one could never change; refuse both here."""
    from prunekit.patterns import NM, parse_pattern
    from prunekit.recipes.goal import is_search

    sparsity, pattern = kwargs.get("sparsity"), kwargs.get("pattern")
    if sparsity is None or not isinstance(pattern, str):
        return []
    try:
        parsed = parse_pattern(pattern)
    except ValueError:
        return []  # the pattern's own check reports it
    if not isinstance(parsed, NM):
        return []
    fixed = f"pattern {pattern!r} fixes the sparsity at {parsed.sparsity:g}"
    if is_search(sparsity):
        return [("sparsity", f"cannot be searched with {fixed}; search an unstructured one")]
    if isinstance(sparsity, int | float) and abs(sparsity - parsed.sparsity) > 1e-9:
        return [("sparsity", f"{fixed}, got {sparsity!r}; leave sparsity out with N:M")]
    return []


STRUCTURED_TARGETS = ("target_macs", "target_params", "target_latency")


def _ratio_and_target(kwargs: dict[str, Any]) -> list[tuple[str, str]]:
    """``prune_structured`` ignores ``ratio`` when a target is given (its docstring says so), so
    a recipe with both would silently drop the ratio; and it refuses ``target_latency`` with
    ``target_macs``, and with ``unit: layer`` the keywords depth pruning does not use, when its
    stage comes up. Refuse them all when the recipe is read."""
    from prunekit.recipes.goal import is_search

    targets = [k for k in STRUCTURED_TARGETS if kwargs.get(k) is not None]
    problems = []
    if targets and kwargs.get("ratio") is not None:
        given = " and ".join(targets)
        if is_search(kwargs["ratio"]):
            message = (
                f"cannot be searched with {given}: the target decides how much is removed; "
                f"search {targets[0]} instead, or leave {given} out"
            )
        else:
            message = (
                f"is ignored when {given} is given (the target decides how much is removed); "
                f"keep one: leave ratio out, or leave {given} out"
            )
        problems.append(("ratio", message))
    if kwargs.get("unit") == "layer":
        from prunekit.graph.pruner import layer_unit_problems

        problems += layer_unit_problems(kwargs)
    if kwargs.get("target_latency") is not None and kwargs.get("target_macs") is not None:
        problems.append(
            (
                "target_latency",
                "give target_latency or target_macs, not both (target_latency searches the MACs)",
            )
        )
    return problems


def _bits(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, dict):  # {pattern: bits or [bits, granularity]}, as save checks it
        from prunekit.compress.io import _bit_rules

        _bit_rules(value, "per_channel")
        return
    from prunekit.compress.quantize import check_bits

    check_bits(value)


def _granularity(value: Any) -> None:
    from prunekit.compress.quantize import parse_granularity

    parse_granularity(value)


def _criteria() -> list[str]:
    from prunekit.scores.base import _REGISTRY

    return sorted(_REGISTRY)


def _const(module: str, name: str) -> Callable[[], Iterable[str]]:
    def get() -> Iterable[str]:
        import importlib

        return getattr(importlib.import_module(module), name)

    return get


def _structured_importance() -> list[str]:
    from prunekit.graph.cli import LAYER_IMPORTANCE, WIDTH_IMPORTANCE

    return [*WIDTH_IMPORTANCE, *LAYER_IMPORTANCE]


def _teacher(value: Any) -> None:
    if value not in (None, "dense"):
        raise ValueError(
            f"a recipe's teacher is 'dense' (the model before the first stage) or null, got {value!r}"
        )


@dataclass
class StageSpec:
    """How one verb runs as a stage."""

    name: str
    verb_path: str  # "module:function"
    checks: dict[str, Callable[[Any], None]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # annotation overrides
    needs_fn: Callable[[dict[str, Any]], list[str]] = lambda kwargs: []
    reasons: dict[str, str] = field(default_factory=dict)
    # keys checked together, on the keywords as written ('search' included): (key, message)
    together: Callable[[dict[str, Any]], list[tuple[str, str]]] = lambda kwargs: []
    _model: Any = None

    def verb(self) -> Callable[..., Any]:
        import importlib

        module, _, func = self.verb_path.partition(":")
        return getattr(importlib.import_module(module), func)

    def needs(self, kwargs: dict[str, Any]) -> list[str]:
        return self.needs_fn(kwargs)

    def why(self, kind: str) -> str:
        return self.reasons.get(kind, f"{self.name} uses it")

    def parameters(self) -> dict[str, inspect.Parameter]:
        sig = inspect.signature(self.verb())
        return {
            n: p
            for n, p in list(sig.parameters.items())[1:]  # the model comes first
            if n not in SUPPLIED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def _pydantic_model(self) -> type[pydantic.BaseModel]:
        if self._model is None:
            func = self.verb()
            try:
                hints = typing.get_type_hints(func)
            except Exception:  # an annotation that does not resolve: check that one loosely
                hints = {}
            fields = {}
            for name, param in self.parameters().items():
                annotation = self.overrides.get(name, hints.get(name, Any))
                default = param.default if param.default is not param.empty else ...
                fields[name] = (annotation, default)
            config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
            self._model = pydantic.create_model(f"{self.name}_stage", __config__=config, **fields)
        return self._model

    def validate(self, kwargs: dict[str, Any]) -> list[tuple[str, str]]:
        """Every problem with these keywords, as (key, message); empty when they are fine."""
        problems: list[tuple[str, str]] = []
        params = self.parameters()
        for key in kwargs:
            if key in SUPPLIED:
                problems.append(
                    (key, f"{key} is given to prunekit.compress (or the CLI), not in the recipe")
                )
            elif key not in params:
                problems.append((key, f"unknown key; {self.name} accepts: {', '.join(params)}"))
        known = {k: v for k, v in kwargs.items() if k in params}
        bad_keys = set()
        try:
            self._pydantic_model().model_validate(known)
        except pydantic.ValidationError as exc:
            for err in exc.errors():
                key = str(err["loc"][0]) if err["loc"] else ""
                if key in bad_keys:
                    continue
                if err["type"] == "missing":
                    problems.append((key, "required"))
                else:
                    problems.append((key, f"{err['msg']} (got {known.get(key)!r})"))
                bad_keys.add(key)
        for key, check in self.checks.items():
            if key in known and key not in bad_keys:
                try:
                    check(known[key])
                except (ValueError, TypeError) as exc:
                    problems.append((key, str(exc)))
        return problems


def _prune_needs(kwargs: dict[str, Any]) -> list[str]:
    from prunekit.scores import get_criterion

    try:
        criterion = get_criterion(kwargs.get("method", "magnitude"))
    except (ValueError, KeyError, TypeError):
        return []
    needs = []
    if criterion.needs_data:
        needs.append("data")
    if getattr(criterion, "needs_loss", False):
        needs.append("loss_fn")
    return needs


def _finetune_needs(kwargs: dict[str, Any]) -> list[str]:
    return ["data"] + ([] if kwargs.get("teacher") == "dense" else ["loss_fn"])


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec(
            "prune",
            "prunekit.prune:prune",
            checks={
                "sparsity": _sparsity,
                "method": _choice(_criteria),
                "pattern": _pattern,
                "scope": _choice(_const("prunekit.scope", "SCOPES")),
                "normalize": _choice(
                    lambda: ["auto", *_const("prunekit.scope", "NORMALIZATIONS")()]
                ),
                "max_batches": _at_least_one,
            },
            overrides={"method": str, "pattern": str},
            needs_fn=_prune_needs,
            together=_sparsity_and_pattern,
            reasons={
                "data": "the criterion collects statistics or gradients",
                "loss_fn": "a gradient criterion",
            },
        ),
        StageSpec(
            "oneshot",
            "prunekit.calibrate.oneshot:oneshot",
            checks={
                "sparsity": _sparsity,
                "method": _choice(_const("prunekit.calibrate.oneshot", "METHODS")),
                "allocation": _choice(_const("prunekit.calibrate.oneshot", "ALLOCATIONS")),
                "pattern": _oneshot_pattern,
                "block_size": _at_least_one,
                "damp": _non_negative,
                "owl_lambda": _non_negative,
                "owl_threshold": _positive,
                "calibration_dtype": _calibration_dtype,
            },
            overrides={"pattern": str, "device": str | None, "calibration_dtype": str | None},
            needs_fn=lambda kwargs: ["calib"],
            together=_sparsity_and_pattern,
            reasons={"calib": "one-shot pruning is calibrated on sample inputs"},
        ),
        StageSpec(
            "prune_structured",
            "prunekit.graph.pruner:prune_structured",
            checks={
                "ratio": _sparsity,
                "target_macs": _fraction,
                "target_params": _fraction,
                "target_latency": _sparsity,  # a ratio to dense, in [0, 1) as the verb checks
                "unit": _choice(_const("prunekit.graph.pruner", "UNITS")),
                "scope": _choice(_const("prunekit.graph.pruner", "SCOPES")),
                "importance": _choice(_structured_importance),
                "round_to": _at_least_one,
                "min_keep": _at_least_one,
            },
            overrides={"importance": str | None},
            needs_fn=lambda kwargs: ["example_inputs"],
            together=_ratio_and_target,
            reasons={"example_inputs": "the dependency graph is traced by running the model"},
        ),
        StageSpec(
            "finetune",
            "prunekit.train.finetune:finetune",
            checks={
                "teacher": _teacher,
                "epochs": _at_least_one,
                "max_steps": _at_least_one,
                "lr": _lr,
                "weight_decay": _non_negative,
                "temperature": _positive,
                "task_weight": _non_negative,
                "kd_weight": _non_negative,
                "hidden_weight": _non_negative,
                "grad_clip": _positive,
                "mode": _choice(lambda: ["max", "min"]),
            },
            overrides={"teacher": str | None},
            needs_fn=_finetune_needs,
            reasons={
                "data": "fine-tuning trains on batches",
                "loss_fn": "without teacher: dense there is no other loss",
            },
        ),
        StageSpec(
            "quantize",
            "prunekit.compress.quantize:quantize",
            checks={
                "bits": _bits,
                "granularity": _granularity,
                "mode": _choice(_const("prunekit.compress.quantize", "ACCEPTED_MODES")),
            },
        ),
        StageSpec(
            "save",
            "prunekit.compress.io:save",
            checks={"bits": _bits, "granularity": _granularity},
            needs_fn=lambda kwargs: ["out"],
            reasons={"out": "save writes the model to out/model"},
        ),
    ]
}


def run_stage(
    spec: StageSpec, model: nn.Module, kwargs: dict[str, Any], ctx: Any
) -> tuple[nn.Module, Any]:
    """Run one stage on ``model`` (changed in place where the verb allows); return the model
    and the verb's own report."""
    kwargs = dict(kwargs)
    verb = spec.verb()
    if spec.name == "prune":
        needs = spec.needs(kwargs)
        report = verb(
            model,
            inplace=True,
            data=ctx.data if "data" in needs else None,
            loss_fn=ctx.loss_fn if "loss_fn" in needs else None,
            progress=ctx.progress,
            **kwargs,
        )
        return report.model, report
    if spec.name == "oneshot":
        report = verb(model, ctx.calib, inplace=True, progress=ctx.progress, **kwargs)
        return report.model, report
    if spec.name == "prune_structured":
        report = verb(
            model,
            ctx.example_inputs,
            calib=ctx.calib,
            loss_fn=ctx.loss_fn,
            inplace=True,
            progress=ctx.progress,
            **kwargs,
        )
        return report.model, report
    if spec.name == "finetune":
        teacher = ctx.dense if kwargs.pop("teacher", None) == "dense" else None
        result = verb(
            model,
            ctx.data,
            ctx.loss_fn,
            teacher=teacher,
            inplace=True,
            progress=ctx.progress,
            **kwargs,
        )
        return result.model, result
    if spec.name == "quantize":
        report = verb(model, inplace=True, **kwargs)
        return report.model, report
    if spec.name == "save":
        from prunekit.compress.io import load
        from prunekit.graph.hf import from_pretrained, is_hf, save_pretrained

        target = Path(ctx.out) / "model"
        # Go on with what the file holds (e.g. values quantized on save), so what is measured
        # after this stage is what was written.
        if is_hf(model):
            path = save_pretrained(model, target, source=ctx.source, overwrite=True, **kwargs)
            return from_pretrained(path).eval(), path
        path = verb(model, target, overwrite=True, **kwargs)
        return load(path, model), path
    raise AssertionError(spec.name)  # pragma: no cover - STAGES and run_stage list the same
