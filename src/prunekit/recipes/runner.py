"""``compress``: run a recipe stage by stage, checkpoint every finished stage, measure after
every stage, and write the report.

Checkpoints live under ``out/stages/NN-verb/`` (the model saved with :func:`prunekit.save`,
compressed and exact, plus ``stage.json``), each written to a temporary name and renamed, so a
killed run leaves only whole stages. Every stage carries a fingerprint chained from the input
model's weights, the seed, the prunekit version, the inputs the stage uses (calibration data,
training data, example inputs: see :mod:`prunekit.recipes.fingerprint`) and all the stages up to
it: run the same call again and it resumes at the first stage without a matching checkpoint;
change a stage or its inputs and that stage and every later one run again (and it says what
changed). Each stage seeds torch, numpy and ``random`` with ``seed + stage
number`` before it starts, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit._version import __version__
from prunekit.compress.durable import write_text_atomic
from prunekit.compress.io import _atomic_dir_write, load, save
from prunekit.recipes import fingerprint
from prunekit.recipes.goal import (
    Goal,
    GoalCheck,
    Knob,
    SearchResult,
    Trial,
    check_goal,
    goal_met,
    retime_reason,
    search,
    verdict,
)
from prunekit.recipes.measure import MeasureSettings, measure, retime
from prunekit.recipes.metrics import Metric, as_metric
from prunekit.recipes.schema import Recipe, RecipeError, check_inputs, load_recipe
from prunekit.recipes.stages import STAGES, run_stage
from prunekit.runtime.copies import check_copy, copy_model

STAGES_DIR = "stages"
STAGE_FILE = "stage.json"
# why compress copies the model whatever inplace says (runtime.copies refuses copies that
# would not fit in memory and says why they are made)
_REFERENCE = (
    "keeps the dense model as the reference every stage is measured against (inplace=True "
    "prunes yours, so the reference is a copy)"
)
_WORKING = (
    "keeps your model as the dense reference and runs the stages on a copy (inplace=True "
    "copies the reference instead: the same memory)"
)
_TRIAL = "starts every search trial (and keeps the stages before the searched one) from a copy"


@dataclass
class StageResult:
    """One row of the stage table."""

    label: str
    verb: str
    kwargs: dict[str, Any]
    seconds: float
    metrics: dict[str, Any]
    resumed: bool = False
    summary: str = ""


@dataclass
class CompressReport:
    """What :func:`compress` returns: the model, the dense reference row, one row per stage.

    ``print(report)`` shows the stage table; ``to_dict()`` is what ``report.json`` holds.
    """

    model: nn.Module
    recipe: Recipe
    dense: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    out: Path | None = None
    quality_name: str = "quality"
    higher_is_better: bool = True
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    goal: list[GoalCheck] | None = None
    goal_met: bool | None = None
    search: SearchResult | None = None

    def rows(self) -> list[dict[str, Any]]:
        """The stage table as dicts: dense first, then one per stage."""
        from prunekit.analysis.pipeline_report import table_rows

        return table_rows(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prunekit_version": __version__,
            "recipe": self.recipe.to_dict(),
            "quality": {"name": self.quality_name, "higher_is_better": self.higher_is_better},
            "settings": self.settings,
            "dense": self.dense,
            "stages": [vars(s).copy() for s in self.stages],
            "out": str(self.out) if self.out else None,
            "files": self.files,
            "goal": None
            if self.goal is None
            else {"met": self.goal_met, "checks": [vars(c) for c in self.goal]},
            "search": self.search.to_dict() if self.search else None,
        }

    def __str__(self) -> str:
        from prunekit.analysis.pipeline_report import text_table

        return text_table(self)


@dataclass
class _Context:
    calib: Any
    data: Any
    loss_fn: Any
    example_inputs: Any
    dense: nn.Module
    out: Path | None
    progress: bool
    source: Path | None = None


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _timed_as_served(model: nn.Module, settings: MeasureSettings, example_inputs: Any) -> bool:
    """Whether the latency of ``model`` will be timed after ``prunekit.accelerate``."""
    from prunekit.recipes.served import serves_accelerated

    return bool(settings.latency and example_inputs is not None) and serves_accelerated(
        model, settings.accelerate
    )


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[prunekit compress] {message}", flush=True)


def _check_out(out: Path) -> None:
    """Fail before any work when ``out`` cannot be written."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_text("")
    except OSError as exc:
        raise PermissionError(f"out={out} is not writable: {exc}") from exc
    finally:
        probe.unlink(missing_ok=True)


def _finished_stages(
    out: Path, recipe: Recipe, chains: list[str], used: list[dict[str, str]], progress: bool
) -> list[dict[str, Any]]:
    """The records (stage.json) of the leading stages whose checkpoints match; stale
    checkpoints are removed."""
    root = out / STAGES_DIR
    records: list[dict[str, Any]] = []
    for stage, chain, inputs in zip(recipe.stages, chains, used, strict=True):
        record = root / stage.label / STAGE_FILE
        if not record.is_file():
            break
        try:
            saved = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            break
        if saved.get("chain") != chain:
            _log(
                progress,
                f"stage {stage.index} ({stage.verb}) differs from the checkpoint in {root} "
                f"({fingerprint.what_changed(saved.get('inputs'), inputs)}): "
                f"stages {stage.index}.. run again",
            )
            break
        records.append(saved)
    if root.is_dir():
        keep = {s.label for s in recipe.stages[: len(records)]}
        for item in root.iterdir():
            if item.name not in keep:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink()
    return records


def compress(
    model: nn.Module,
    recipe: Any,
    *,
    calib: Iterable[Any] | None = None,
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    evaluate: Callable[[nn.Module], float] | Metric | None = None,
    example_inputs: Any = None,
    out: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    resume: bool = True,
    inplace: bool = False,
    progress: bool = True,
) -> CompressReport:
    """Run a recipe end to end: prune, recover, quantize, save; measured after every stage.

    A recipe may state a ``goal:`` (a quality floor, a file size, a latency, a MAC / parameter /
    non-zero budget) and mark one stage's ratio ``search``: the pipeline is then run at the
    values a bisection asks for, each trial measured after its last stage, and the value that
    meets the goal is kept (see :mod:`prunekit.recipes.goal`). Every trial is in the report.

    Args:
        model: the dense model. Left untouched unless ``inplace=True``; either way one copy is
            kept as the dense reference (the ``teacher: dense`` of ``finetune`` stages, and the
            left-hand column of every comparison).
        recipe: a shipped recipe's name (``prunekit recipes`` lists them), a YAML/JSON file or
            string, or a dict; validated whole before anything runs.
        calib: calibration samples for ``oneshot`` stages (see :func:`prunekit.calibration`).
        data, loss_fn: training batches and ``loss_fn(model, batch) -> loss`` for ``finetune``
            (``loss_fn`` is optional with ``teacher: dense``) and data-driven ``prune`` methods.
        evaluate: quality, ``evaluate(model) -> float`` (higher is better), or a built-in
            :mod:`prunekit.recipes.metrics` measure (accuracy, perplexity, fidelity, STS).
        example_inputs: inputs for tracing (``prune_structured``), MAC counts and latency.
        out: folder for stage checkpoints, the saved model (``out/model``) and the report
            (``report.json``, ``report.md``, ``report.html``). Without it nothing is written
            and nothing can be resumed.
        source: the Hugging Face folder the model was loaded from; ``save`` stages then write a
            Hugging Face folder (:func:`prunekit.save_pretrained`) with its side files
            (tokenizer, ...). Hugging Face models are saved that way even without it.
        resume: continue from the checkpoints in ``out`` (default) that were made from the same
            model, recipe and inputs; False starts over. Training data that is neither a list
            nor a ``DataLoader`` over a ``TensorDataset`` is recognised by type and length only
            (:mod:`prunekit.recipes.fingerprint`): pass False after changing its contents.
        inplace: run the stages on ``model`` itself (not with a ``search`` value, whose trials
            each start from a copy).
        progress: print stage progress and the verbs' progress bars.

    Returns:
        A :class:`CompressReport`: ``.model`` is the result, ``print(report)`` the stage table,
        ``.goal`` the goal's checks and ``.search`` the trials when the recipe has a goal.

    Example:
        >>> report = prunekit.compress(model, "cnn-small", data=loader, loss_fn=ce,  # doctest: +SKIP
        ...                            evaluate=prunekit.recipes.metrics.accuracy(test),
        ...                            example_inputs=x, out="runs/cnn")
        >>> print(report)  # doctest: +SKIP
    """
    recipe = load_recipe(recipe)
    available = {
        "calib": calib is not None,
        "data": data is not None,
        "loss_fn": loss_fn is not None,
        "example_inputs": example_inputs is not None,
        "out": out is not None,
    }
    check_inputs(recipe, available)
    if isinstance(loss_fn, nn.Module):  # nn.CrossEntropyLoss() and friends take (logits, y)
        raise TypeError(
            f"loss_fn is called as loss_fn(model, batch) -> loss, got the module "
            f"{type(loss_fn).__name__}(); wrap it: loss_fn=lambda model, batch: "
            f"torch.nn.{type(loss_fn).__name__}()(model(batch[0]), batch[1])"
        )
    check_layer_patterns(recipe, model)
    metric = as_metric(evaluate)
    _check_goal_inputs(recipe, metric is not None, example_inputs is not None)
    if recipe.knob is not None and inplace:
        raise ValueError(
            "inplace=True cannot be used with a 'search' value: every trial starts from a copy "
            "of the input model; leave inplace=False"
        )
    out_path = Path(out) if out is not None else None
    if out_path is not None:
        _check_out(out_path)
    settings = MeasureSettings.from_recipe(recipe.measure)

    if not inplace:  # the working copy is made after the dense measurement: refuse it now
        check_copy(model, "compress", _WORKING)
    dense = copy_model(model, "compress", _REFERENCE) if inplace else model
    dense.eval()
    if metric is not None and metric.needs_reference:
        metric = metric.bind(dense)
    ctx = _Context(
        list(calib) if calib is not None else None,
        data,
        loss_fn,
        example_inputs,
        dense,
        out_path,
        progress,
        Path(source) if source is not None else None,
    )
    if out_path is not None and not resume:  # start over; this run's checkpoints are reused
        shutil.rmtree(out_path / STAGES_DIR, ignore_errors=True)
        shutil.rmtree(out_path / SEARCH_DIR, ignore_errors=True)
    given = {"calib": ctx.calib, "data": data, "example_inputs": example_inputs}
    run = _Run(
        ctx,
        metric,
        settings,
        fingerprint.model_fingerprint(dense),
        {k: fingerprint.input_fingerprint(v) for k, v in given.items() if v is not None},
    )

    _log(progress, f"measuring the dense model ({recipe.name or recipe.source})")
    run.dense_row = measure(
        dense, dense=None, example_inputs=example_inputs, evaluate=metric, settings=settings
    )
    report = CompressReport(
        model=model,
        recipe=recipe,
        dense=run.dense_row,
        out=out_path,
        quality_name=metric.name if metric else "quality",
        higher_is_better=metric.higher_is_better if metric else True,
        settings={**vars(settings), "seed": recipe.seed, "torch_threads": torch.get_num_threads()},
    )

    concrete = recipe
    if recipe.knob is not None:
        report.search, concrete, kept = _search(run, recipe, report.higher_is_better)
        if kept is not None:  # no out folder: the chosen trial's model and rows
            report.model, report.stages = kept
    if recipe.knob is None or out_path is not None:
        start = model if inplace else copy_model(dense, "compress", _WORKING)
        finish = None
        if recipe.knob is None and recipe.goal is not None:  # a search re-times its trials
            finish = _retimer(run, recipe.goal, report.higher_is_better)
        report.model, report.stages = run.execute(concrete, start, finish=finish)
    if recipe.goal is not None and report.stages:
        report.goal = check_goal(
            recipe.goal, report.stages[-1].metrics, run.dense_row, report.higher_is_better
        )
        report.goal_met = goal_met(report.goal)
        _log(progress, verdict(report.goal))
    if out_path is not None:
        from prunekit.analysis.pipeline_report import write_report

        # known before they are written, so that report.json lists them too
        report.files = {kind: str(out_path / f"report.{kind}") for kind in ("json", "md", "html")}
        report.files = write_report(report, out_path)
        _log(progress, f"report written to {report.files.get('html') or report.files['md']}")
    return report


def check_layer_patterns(recipe: Recipe, model: nn.Module) -> None:
    """Raise :class:`RecipeError` naming every stage whose name patterns match no layer of
    ``model``, before anything runs: ``targets``, ``ignore`` and ``per_layer`` of ``prune``,
    ``oneshot`` and ``quantize`` stages, and a ``save`` stage's ``bits`` mapping.

    No stage adds layers or renames weights, so a pattern that matches nothing in the input
    model cannot match later either; the verbs would raise the same error, but only when their
    stage comes up, after the dense model was measured and the stages before it ran.
    """
    from prunekit.compress.io import (
        _bit_rules,
        _check_bit_patterns,
        _dedupe_shared,
        effective_state,
    )
    from prunekit.targets import per_layer_overrides, resolve_targets

    problems = []
    weights = None
    for stage in recipe.stages:
        kwargs = stage.kwargs
        try:
            if stage.verb == "save" and isinstance(kwargs.get("bits"), dict):
                if weights is None:  # the tensors a compressed save encodes
                    weights, _ = _dedupe_shared(effective_state(model)[0])
                rules = _bit_rules(kwargs["bits"], kwargs.get("granularity", "per_channel"))
                _check_bit_patterns(rules, weights)
            if stage.verb not in ("prune", "oneshot", "quantize") or not any(
                kwargs.get(key) for key in ("targets", "ignore", "per_layer")
            ):
                continue
            chosen = resolve_targets(
                model,
                kwargs.get("targets"),
                kwargs.get("ignore"),
                embeddings=stage.verb == "prune",  # as each verb resolves them
            )
            if isinstance(kwargs.get("per_layer"), dict):
                per_layer_overrides(chosen, kwargs["per_layer"])
        except ValueError as exc:
            problems.append(f"stage {stage.index}, {stage.verb}: {exc}")
    if problems:
        raise RecipeError(recipe.source, problems)


def _check_goal_inputs(recipe: Recipe, has_metric: bool, has_example: bool) -> None:
    goal = recipe.goal
    if goal is None:
        return
    problems = []
    if goal.has_quality and not has_metric:
        problems.append("goal: quality needs evaluate= (a quality measure)")
    if (goal.macs is not None or goal.latency is not None) and not has_example:
        problems.append("goal: macs and latency need example_inputs= to count and time the model")
    if problems:
        raise RecipeError(recipe.source, problems)


@dataclass
class _Run:
    """What every execution of a recipe (the final one and each search trial) shares."""

    ctx: _Context
    metric: Metric | None
    settings: MeasureSettings
    model_hash: str
    input_hashes: dict[str, str]  # calib / data / example_inputs, those given
    dense_row: dict[str, Any] = field(default_factory=dict)
    # without an out folder: model copies after the stages before the searched one, by chain
    memory: dict[str, tuple[nn.Module, StageResult]] = field(default_factory=dict)
    produced: set[str] = field(default_factory=set)  # chains whose stage ran in this call

    def used_inputs(self, recipe: Recipe) -> list[dict[str, str]]:
        """Per stage, the fingerprints its checkpoint depends on: the run's base, the stage as
        written and the inputs (calib, data, example_inputs) that stage uses."""
        base = fingerprint.base_fingerprint_of(self.model_hash, recipe.seed)
        used = []
        for stage in recipe.stages:
            needs = STAGES[stage.verb].needs(stage.kwargs)
            inputs = {k: v for k, v in self.input_hashes.items() if k in needs}
            used.append({**base, "stage": stage.fingerprint(), **inputs})
        return used

    def chains(self, recipe: Recipe, used: list[dict[str, str]] | None = None) -> list[str]:
        """Each stage's chain, from :meth:`used_inputs` (given, or worked out here)."""
        chains, previous = [], ""
        for inputs in used if used is not None else self.used_inputs(recipe):
            previous = fingerprint.chain(previous, inputs)
            chains.append(previous)
        return chains

    def execute(
        self,
        recipe: Recipe,
        work: nn.Module,
        keep_before: int = 0,
        finish: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    ) -> tuple[nn.Module, list[StageResult]]:
        """Run ``recipe`` on ``work``, resuming from matching checkpoints (in ``out``, or in
        memory for the first ``keep_before`` stages); return the model and the stage rows.
        ``finish(model, metrics)`` may amend the last stage's measurements (a search trial
        re-times its latency) before they are printed and checkpointed."""
        ctx, out_path, progress = self.ctx, self.ctx.out, self.ctx.progress
        used = self.used_inputs(recipe)
        chains = self.chains(recipe, used)
        rows: list[StageResult] = []
        done = 0
        if out_path is not None:
            records = _finished_stages(out_path, recipe, chains, used, progress)
            done = len(records)
            if done:
                last = recipe.stages[done - 1]
                folder = out_path / STAGES_DIR / last.label
                _log(progress, f"resuming after stage {last.index} ({last.verb}) from {folder}")
                work = load(folder / "model", work)
                rows = [
                    StageResult(
                        label=stage.label,
                        verb=stage.verb,
                        kwargs=stage.kwargs,
                        seconds=saved["seconds"],
                        metrics=saved["metrics"],
                        resumed=chain not in self.produced,
                        summary=saved.get("summary", ""),
                    )
                    for stage, saved, chain in zip(recipe.stages, records, chains, strict=False)
                ]
        elif out_path is None:
            while done < keep_before and chains[done] in self.memory:
                done += 1
            if done:
                work = copy_model(self.memory[chains[done - 1]][0], "compress", _TRIAL)
                rows = [copy.copy(self.memory[c][1]) for c in chains[:done]]

        for stage, chain, inputs in list(zip(recipe.stages, chains, used, strict=True))[done:]:
            _log(progress, f"stage {stage.index}/{len(recipe.stages)}: {stage.verb} {stage.kwargs}")
            _seed_everything(recipe.seed + stage.index)
            start = time.perf_counter()
            work, verb_report = run_stage(STAGES[stage.verb], work, stage.kwargs, ctx)
            seconds = time.perf_counter() - start
            saved_path = verb_report if stage.verb == "save" else None
            last = stage is recipe.stages[-1]
            if self.settings.every_stage or last:
                if _timed_as_served(work, self.settings, ctx.example_inputs):
                    _log(progress, f"timing {stage.label} as served: prunekit.accelerate at "
                                   f"batch {', '.join(map(str, self.settings.batch_sizes))}")  # fmt: skip
                metrics = measure(
                    work,
                    dense=ctx.dense,
                    example_inputs=ctx.example_inputs,
                    evaluate=self.metric,
                    settings=self.settings,
                    saved=saved_path,
                )
            else:
                metrics = {}
            if last and finish is not None and metrics:
                finish(work, metrics)
            result = StageResult(
                label=stage.label,
                verb=stage.verb,
                kwargs=stage.kwargs,
                seconds=seconds,
                metrics=metrics,
                summary=_summary(verb_report),
            )
            rows.append(result)
            self.produced.add(chain)
            if progress:
                print(f"[prunekit compress] {_one_line(result, self.dense_row, self.metric)}")
            if out_path is not None:
                folder = out_path / STAGES_DIR / stage.label
                _write_checkpoint(folder, work, result, chain, inputs)
            elif stage.index <= keep_before:
                self.memory[chain] = (copy_model(work, "compress", _TRIAL), result)
        return work, rows


SEARCH_DIR = "search"
TRIALS_FILE = "trials.json"


def _search(
    run: _Run, recipe: Recipe, higher_is_better: bool
) -> tuple[SearchResult, Recipe, tuple[nn.Module, list[StageResult]] | None]:
    """Bisect the recipe's ``search`` value for its goal.

    With an ``out`` folder, trials share the checkpoints of the stages before the searched one;
    the best trial so far keeps its later stages (and its saved model) in ``out/search/best``,
    and they are moved back into place at the end, so the final run only reads checkpoints.
    ``out/search/trials.json`` records every trial; a resumed search reuses them."""
    knob, goal = recipe.knob, recipe.goal
    assert knob is not None and goal is not None
    out = run.ctx.out
    records = _rejudged(_read_trials(out), goal, run, higher_is_better) if out is not None else {}
    last: dict[str, Any] = {}  # the trial just run
    kept: dict[str, Any] = {}  # what is kept of the best trial so far

    def trial(value: float) -> tuple[list[GoalCheck], bool]:
        concrete = recipe.with_value(value)
        chain = run.chains(concrete)[-1]
        last.clear()
        last.update(chain=chain, concrete=concrete)
        if chain in records:
            return [GoalCheck(**c) for c in records[chain]["checks"]], True
        start = copy_model(run.ctx.dense, "compress", _TRIAL)

        def others() -> list[tuple[float, list[GoalCheck]]]:
            return [
                (r["value"], [GoalCheck(**c) for c in r["checks"]])
                for c, r in records.items()
                if c != chain
            ]

        finish = _retimer(run, goal, higher_is_better, knob, value, others)
        model, rows = run.execute(concrete, start, keep_before=knob.index, finish=finish)
        checks = check_goal(goal, rows[-1].metrics, run.dense_row, higher_is_better)
        records[chain] = {
            "value": value,
            "checks": [vars(c) for c in checks],
            "metrics": rows[-1].metrics,
        }
        if out is not None:
            write_text_atomic(out / SEARCH_DIR / TRIALS_FILE, json.dumps(records, indent=1) + "\n")
        last.update(ran=True, result=(model, rows))
        return checks, False

    def on_best(_: Trial) -> None:
        kept.clear()
        if out is not None:
            if last.get("ran"):
                _stash_best(out, last["concrete"], knob.index, last["chain"])
            if _best_chain(out) == last["chain"]:
                kept["chain"] = last["chain"]
        elif last.get("ran"):
            kept.update(chain=last["chain"], result=last["result"])

    result = search(knob, goal, trial, progress=run.ctx.progress, on_best=on_best)
    assert result.chosen is not None
    chosen = recipe.with_value(result.chosen.value)
    chosen_chain = run.chains(chosen)[-1]
    if out is not None:
        if kept.get("chain") == chosen_chain:
            _restore_best(out, chosen, knob.index)
        return result, chosen, None
    if kept.get("chain") == chosen_chain:
        return result, chosen, kept["result"]
    start = copy_model(run.ctx.dense, "compress", _TRIAL)
    return result, chosen, run.execute(chosen, start, knob.index)


def _retimer(
    run: _Run,
    goal: Goal,
    higher_is_better: bool,
    knob: Knob | None = None,
    value: float = 0.0,
    others: Callable[[], list[tuple[float, list[GoalCheck]]]] = list,
) -> Callable[[nn.Module, dict[str, Any]], None]:
    """The ``finish`` of :meth:`_Run.execute` that re-times, once, a latency verdict timing
    noise may have decided (:func:`retime_reason`): a search trial (``knob``, ``value`` and the
    other trials' checks from ``others()``) or a recipe's only run (no knob)."""

    def finish(model: nn.Module, metrics: dict[str, Any]) -> None:
        batch = str(goal.latency_batch)
        row = (metrics.get("latency") or {}).get(batch)
        checks = check_goal(goal, metrics, run.dense_row, higher_is_better)
        reason = retime_reason(goal, knob, value, checks, row, others())
        if reason is None:
            return
        what = f"{knob.key}={value:g}" if knob is not None else "the compressed model"
        _log(run.ctx.progress, f"re-timing {what} beside dense: {reason}")
        metrics["latency"][batch] = retime(
            model,
            run.ctx.dense,
            run.ctx.example_inputs,
            run.settings,
            goal.latency_batch,
            row,
            reason,
        )

    return finish


def _rejudged(
    records: dict[str, Any], goal: Goal, run: _Run, higher_is_better: bool
) -> dict[str, Any]:
    """The saved trials of an earlier search, each judged by the current ``goal`` from its
    measurements (the goal may have changed since); trials that cannot be (no measurements
    kept, no latency at the goal's batch) are left out, to run again if the search needs them."""
    kept = {}
    for chain, record in records.items():
        if isinstance(record, dict) and "value" in record:
            metrics = record.get("metrics")
            if _measured_for(goal, metrics):
                checks = check_goal(goal, metrics, run.dense_row, higher_is_better)
                kept[chain] = {**record, "checks": [vars(c) for c in checks]}
    return kept


def _measured_for(goal: Goal, metrics: Any) -> bool:
    """Whether a saved trial's measurements can be checked against ``goal``: they exist (trial
    records before they were kept hold only verdicts, which a changed goal would make stale),
    and hold the latency at the goal's batch when the goal has a latency bound."""
    if not isinstance(metrics, dict):
        return False
    if goal.latency is None:
        return True
    return str(goal.latency_batch) in (metrics.get("latency") or {})


def _read_trials(out: Path) -> dict[str, Any]:
    path = out / SEARCH_DIR / TRIALS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _best_chain(out: Path) -> str | None:
    try:
        return (out / SEARCH_DIR / "best" / "chain.txt").read_text().strip()
    except OSError:
        return None


def _stash_best(out: Path, recipe: Recipe, knob_index: int, chain: str) -> None:
    """Copy the stage checkpoints from the searched stage on (and out/model) aside as the best
    trial so far, replacing the previous best."""
    best = out / SEARCH_DIR / "best"
    tmp = out / SEARCH_DIR / f".best-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / STAGES_DIR).mkdir(parents=True)
    for stage in recipe.stages[knob_index:]:
        src = out / STAGES_DIR / stage.label
        if src.is_dir():
            shutil.copytree(src, tmp / STAGES_DIR / stage.label)
    if recipe.stages[-1].verb == "save" and (out / "model").is_dir():
        shutil.copytree(out / "model", tmp / "model")
    (tmp / "chain.txt").write_text(chain + "\n")
    shutil.rmtree(best, ignore_errors=True)
    os.replace(tmp, best)


def _restore_best(out: Path, chosen: Recipe, knob_index: int) -> None:
    """Put the chosen trial's later checkpoints and model back where the final run reads them."""
    best = out / SEARCH_DIR / "best"
    for stage in chosen.stages[knob_index:]:
        kept = best / STAGES_DIR / stage.label
        if kept.is_dir():
            target = out / STAGES_DIR / stage.label
            shutil.rmtree(target, ignore_errors=True)
            os.replace(kept, target)
    if (best / "model").is_dir():
        shutil.rmtree(out / "model", ignore_errors=True)
        os.replace(best / "model", out / "model")
    shutil.rmtree(best, ignore_errors=True)


def _summary(verb_report: Any) -> str:
    if isinstance(verb_report, Path):
        return f"written to {verb_report}"
    text = str(verb_report)
    return text if len(text) < 20000 else text[:20000] + "\n..."


def _one_line(result: StageResult, d: dict[str, Any], metric: Metric | None) -> str:
    m = result.metrics
    parts = [f"{result.verb} done in {result.seconds:.1f} s"]
    if "nonzeros" in m:
        parts.append(f"non-zeros {m['nonzeros'] / max(d['nonzeros'], 1):.1%} of dense")
    if "file_bytes" in m:
        parts.append(f"file {m['file_bytes'] / d['fp32_bytes']:.1%} of fp32")
    if "quality" in m:
        name = metric.name if metric else "quality"
        parts.append(f"{name} {m['quality']:.4g} (dense {d.get('quality', 0):.4g})")
    return ", ".join(parts)


def _write_checkpoint(
    folder: Path, model: nn.Module, result: StageResult, chain: str, inputs: dict[str, str]
) -> None:
    record = {
        "chain": chain,
        "inputs": inputs,
        "stage": result.label,
        "verb": result.verb,
        "kwargs": result.kwargs,
        "seconds": result.seconds,
        "metrics": result.metrics,
        "summary": result.summary,
        "prunekit_version": __version__,
    }

    def write(tmp: Path) -> None:
        save(model, tmp / "model", compressed=True)
        (tmp / STAGE_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")

    _atomic_dir_write(folder, True, write)


__all__ = ["CompressReport", "RecipeError", "StageResult", "compress"]
