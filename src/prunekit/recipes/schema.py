"""Recipes: read a recipe (YAML / JSON file or string, a dict, or a shipped name) and validate it
whole before anything runs.

A recipe is an ordered list of stages; each stage names one public verb and its keyword
arguments, so nothing new has to be learnt::

    stages:
      - prune_structured: {unit: [head, channel], target_macs: 0.6}
      - oneshot: {method: sparsegpt, sparsity: 0.6}
      - finetune: {teacher: dense, epochs: 3}
      - quantize: {bits: 8, mode: int}
      - save: {compressed: true}

Each stage's keywords are checked against the verb's own signature (types from its annotations,
through pydantic) plus the ranges the verb enforces, so a recipe can never accept what the verb
would refuse. Every problem is collected and reported at once with its place: stage number,
verb, key, and the line in the file when there is one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from prunekit.recipes.goal import KNOBS, Goal, Knob, find_knob, is_search, parse_goal
from prunekit.recipes.stages import STAGES, StageSpec

TOP_LEVEL_KEYS = ("stages", "seed", "name", "description", "measure", "goal")
MEASURE_KEYS = {
    "latency": bool,
    "batch_sizes": list,
    "repeats": int,
    "threads": int,
    "every_stage": bool,
    "accelerate": bool,
}


class RecipeError(ValueError):
    """A recipe that cannot run; ``problems`` lists every finding with its place."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"recipe {source}: {len(problems)} {noun}\n{lines}")


@dataclass(frozen=True)
class Stage:
    """One validated stage: the verb's name, its keyword arguments, its place in the recipe."""

    verb: str
    kwargs: dict[str, Any]
    index: int  # 1-based, as people count stages

    @property
    def label(self) -> str:
        return f"{self.index:02d}-{self.verb}"

    def fingerprint(self) -> str:
        text = json.dumps({"verb": self.verb, "kwargs": self.kwargs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Recipe:
    """A validated recipe. Build it with :func:`load_recipe`."""

    stages: list[Stage]
    seed: int = 0
    name: str = ""
    description: str = ""
    measure: dict[str, Any] = field(default_factory=dict)
    source: str = "<dict>"
    goal: Goal | None = None
    goal_raw: dict[str, Any] | None = None
    knob: Knob | None = None  # the stage value marked ``search``

    def with_value(self, value: float) -> Recipe:
        """This recipe with the searched value set (the goal is kept, to be checked)."""
        if self.knob is None:
            raise ValueError("the recipe has no 'search' value")
        stages = []
        for stage in self.stages:
            kwargs = dict(stage.kwargs)
            if stage.index == self.knob.index + 1:
                kwargs[self.knob.key] = value
            stages.append(Stage(stage.verb, kwargs, stage.index))
        return Recipe(
            stages=stages,
            seed=self.seed,
            name=self.name,
            description=self.description,
            measure=self.measure,
            source=self.source,
            goal=self.goal,
            goal_raw=self.goal_raw,
        )

    def needs(self) -> dict[str, list[str]]:
        """Which inputs (calib, data, loss_fn, example_inputs) each stage needs, by stage label."""
        out: dict[str, list[str]] = {}
        for stage in self.stages:
            for kind in STAGES[stage.verb].needs(stage.kwargs):
                out.setdefault(kind, []).append(stage.label)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "measure": self.measure,
            "stages": [{s.verb: s.kwargs} for s in self.stages],
        }
        if self.goal_raw is not None:
            out["goal"] = self.goal_raw
        return out


# ------------------------------------------------------------------------------ shipped recipes


def builtin_dir() -> Path:
    return Path(str(resources.files("prunekit.recipes") / "builtin"))


def list_recipes() -> dict[str, str]:
    """Shipped recipes: name -> one-line description.

    Example:
        >>> "cnn-small" in prunekit.recipes.list_recipes()  # doctest: +SKIP
        True
    """
    found = {}
    for path in sorted(builtin_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        lines = str(data.get("description", "")).strip().splitlines()
        found[path.stem] = lines[0] if lines else ""
    return found


# ------------------------------------------------------------------------------ reading


def _read(recipe: Any) -> tuple[Any, str, str | None]:
    """The recipe's data, a name for messages, and its text when it came from text."""
    if isinstance(recipe, Recipe):
        return recipe.to_dict(), recipe.source, None
    if isinstance(recipe, dict):
        return recipe, "<dict>", None
    if isinstance(recipe, os.PathLike) or (
        isinstance(recipe, str) and "\n" not in recipe and ":" not in recipe
    ):
        path = Path(recipe)
        source = str(path)
        if not path.is_file():
            shipped = builtin_dir() / f"{path.name}.yaml"
            # a bare name only: 'foo/cnn-small' is a missing file, not the shipped cnn-small
            if shipped.is_file() and path.suffix == "" and str(path) == path.name:
                # named as `prunekit recipes` lists it, not by where the package is installed
                path, source = shipped, path.name
            else:
                names = ", ".join(list_recipes()) or "none"
                raise RecipeError(
                    str(recipe),
                    [f"no such file, and not a shipped recipe (shipped: {names})"],
                )
        text = path.read_text()
        return _parse_text(text, source), source, text
    if isinstance(recipe, str):
        return _parse_text(recipe, "<string>"), "<string>", recipe
    raise RecipeError(
        "<recipe>",
        [
            f"a recipe is a YAML/JSON file path, a YAML/JSON string, a dict or a shipped name; "
            f"got {type(recipe).__name__}"
        ],
    )


def _parse_text(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(source, [f"{where}not valid YAML/JSON ({problem})"]) from None


def _line_index(text: str | None) -> dict[tuple, int]:
    """1-based line of every node, keyed by its path: ("stages", 2, "oneshot", "sparsity")."""
    if text is None:
        return {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, key.value)] = key.start_mark.line + 1
                walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


# ------------------------------------------------------------------------------ validation


class _Problems:
    def __init__(self, lines: dict[tuple, int]) -> None:
        self.items: list[str] = []
        self.lines = lines

    def add(self, path: tuple, message: str) -> None:
        where = []
        if len(path) >= 2 and path[0] == "stages":
            where.append(f"stage {path[1] + 1}")
            if len(path) >= 3:
                where.append(str(path[2]))
            if len(path) >= 4:
                where.append(f"key {path[3]!r}")
        elif path:
            where.append(f"key {'.'.join(map(str, path))!r}")
        line = None
        for cut in range(len(path), -1, -1):
            line = self.lines.get(path[:cut])
            if line is not None:
                break
        if line is not None:
            where.append(f"line {line}")
        self.items.append(f"{', '.join(where) or 'recipe'}: {message}")


def load_recipe(recipe: Any) -> Recipe:
    """Read and validate a recipe completely; raise :class:`RecipeError` listing every problem.

    ``recipe`` is a path to a YAML or JSON file, a YAML/JSON string, a dict, a :class:`Recipe`,
    or the name of a shipped recipe (``prunekit recipes`` lists them).

    Example:
        >>> r = load_recipe({"stages": [{"prune": {"sparsity": 0.5}}, {"save": {}}]})
        >>> [s.verb for s in r.stages]
        ['prune', 'save']
    """
    data, source, text = _read(recipe)
    problems = _Problems(_line_index(text))
    if not isinstance(data, dict):
        raise RecipeError(source, ["the recipe must be a mapping with a 'stages' list"])
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            problems.add((key,), f"unknown key; accepted: {', '.join(TOP_LEVEL_KEYS)}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.add(("seed",), f"must be a non-negative integer, got {seed!r}")
        seed = 0
    measure = data.get("measure") or {}
    _check_measure(measure, problems)
    stages = _check_stages(data.get("stages"), problems)
    if stages:
        _check_order(stages, problems)
    goal, knob = _check_goal(data.get("goal"), stages, measure, problems)
    if problems.items:
        raise RecipeError(source, problems.items)
    return Recipe(
        stages=stages,
        seed=seed,
        name=str(data.get("name", "") or (Path(source).stem if source[0] != "<" else "")),
        description=str(data.get("description", "") or ""),
        measure=measure,
        source=source,
        goal=goal,
        goal_raw=data.get("goal"),
        knob=knob,
    )


def _check_goal(
    raw: Any, stages: list[Stage], measure: Any, problems: _Problems
) -> tuple[Goal | None, Knob | None]:
    goal, found = parse_goal(raw)
    for key, message in found:
        problems.add(("goal", *((key,) if key else ())), message)
    knob, found = find_knob([(s.verb, s.kwargs) for s in stages])
    for index, verb, key, message in found:
        problems.add(("stages", index, verb, key), message)
    if knob is not None and raw is None:
        problems.add(
            ("stages", knob.index, knob.verb, knob.key),
            "a 'search' value needs a goal: section saying what to search for "
            "(e.g. goal: {quality: 0.99} or goal: {file: 0.05})",
        )
    if goal is not None and goal.latency is not None and isinstance(measure, dict):
        if measure.get("latency") is False:
            problems.add(
                ("goal", "latency"), "needs latency measured; remove measure.latency: false"
            )
        batches = measure.get("batch_sizes", [1, 32])
        if isinstance(batches, list) and goal.latency_batch not in batches:
            problems.add(
                ("goal", "latency"),
                f"batch {goal.latency_batch} is not among measure.batch_sizes {batches}",
            )
    return goal, knob


def _check_measure(measure: Any, problems: _Problems) -> None:
    if not isinstance(measure, dict):
        problems.add(("measure",), f"must be a mapping, got {type(measure).__name__}")
        return
    for key, value in measure.items():
        kind = MEASURE_KEYS.get(key)
        if kind is None:
            problems.add(("measure", key), f"unknown key; accepted: {', '.join(MEASURE_KEYS)}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.add(("measure", key), f"must be {kind.__name__}, got {value!r}")
        elif key == "batch_sizes" and not value:
            problems.add(
                ("measure", key),
                "must list at least one batch size (e.g. [1, 32]); "
                "to time nothing, set latency: false",
            )
        elif key == "batch_sizes" and not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value
        ):
            problems.add(("measure", key), f"must be a list of positive integers, got {value!r}")
        elif kind is int and value < 1:
            problems.add(("measure", key), f"must be >= 1, got {value}")


def _check_stages(raw: Any, problems: _Problems) -> list[Stage]:
    if raw is None:
        problems.add(("stages",), "missing: a recipe needs a 'stages' list")
        return []
    if not isinstance(raw, list) or not raw:
        problems.add(("stages",), "must be a non-empty list of {verb: {keyword: value}}")
        return []
    stages = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            problems.add(
                ("stages", i),
                "each stage is one mapping {verb: {keyword: value}}, e.g. {prune: {sparsity: 0.5}}",
            )
            continue
        ((verb, kwargs),) = item.items()
        spec = STAGES.get(verb)
        if spec is None:
            problems.add(("stages", i), f"unknown stage {verb!r}; accepted: {', '.join(STAGES)}")
            continue
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            problems.add(("stages", i, verb), "the keywords must be a mapping")
            continue
        # a 'search' on a verb's keyword that cannot be searched is reported once (with the
        # goal), not also as a type error about a stand-in value
        checked = {
            k: _stand_in(verb, k, v)
            for k, v in kwargs.items()
            if not (is_search(v) and (verb, k) not in KNOBS and k in spec.parameters())
        }
        found = spec.validate(checked)
        bad = {key for key, _ in found}
        found += [(k, m) for k, m in spec.together(kwargs) if k not in bad]
        for key, message in found:
            problems.add(("stages", i, verb, *((key,) if key else ())), message)
        stages.append(Stage(verb=verb, kwargs=dict(kwargs), index=i + 1))
    return stages


def _stand_in(verb: str, key: str, value: Any) -> Any:
    """A searched value is checked as the middle of its range (the range itself is checked
    with the goal)."""
    if not is_search(value):
        return value
    low, high, _ = KNOBS.get((verb, key), (0.5, 0.5, 1))
    return (low + high) / 2


def _check_order(stages: list[Stage], problems: _Problems) -> None:
    """Orders that cannot give what they promise."""
    seen: dict[str, int] = {}
    for stage in stages:
        path = ("stages", stage.index - 1, stage.verb)
        if "save" in seen:
            problems.add(path, f"comes after 'save' (stage {seen['save'] + 1}); save must be last")
        if (
            stage.verb in ("finetune", "prune", "oneshot", "prune_structured")
            and "quantize" in seen
        ):
            problems.add(
                path,
                f"{stage.verb} after quantize (stage {seen['quantize'] + 1}) moves the weights off "
                "the quantization grid; put quantize after every pruning and training stage",
            )
        if stage.verb == "prune_structured" and ({"prune", "oneshot"} & set(seen)):
            first = min(seen[v] for v in ("prune", "oneshot") if v in seen)
            problems.add(
                path,
                f"structured pruning after unstructured pruning (stage {first + 1}) would score "
                "channels on masked weights; put prune_structured first",
            )
        seen.setdefault(stage.verb, stage.index - 1)


def check_inputs(recipe: Recipe, available: dict[str, bool], source: str | None = None) -> None:
    """Raise :class:`RecipeError` naming every stage whose inputs were not given."""
    problems = []
    for stage in recipe.stages:
        spec: StageSpec = STAGES[stage.verb]
        for kind in spec.needs(stage.kwargs):
            if not available.get(kind):
                problems.append(
                    f"stage {stage.index}, {stage.verb}: needs {kind}= ({spec.why(kind)}), "
                    "which was not given"
                )
    if problems:
        raise RecipeError(source or recipe.source, problems)
