"""Recipes and the pipeline: validation of every bad recipe before anything runs, the formats a
recipe comes in, the measured stage table, the report files, resume and kill-and-resume."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import prunekit
from conftest import SmallCNN
from prunekit.recipes import RecipeError, compress, list_recipes, load_recipe, metrics
from prunekit.recipes.stages import STAGES

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {
    "stages": [
        {"prune": {"sparsity": 0.5}},
        {"finetune": {"teacher": "dense", "epochs": 1}},
        {"quantize": {"bits": 8, "mode": "int"}},
        {"save": {"compressed": True}},
    ],
    "measure": {"latency": False},
}

# (recipe text, the place the message must name, what it must say)
BAD_RECIPES = [
    ("stages: []", "key 'stages', line 1", "non-empty list"),
    ("seed: 1", "key 'stages'", "missing"),
    ("stages:\n  - prune: {sparsity: 1.5}", "stage 1, prune, key 'sparsity', line 2", "[0, 1)"),
    ("stages:\n  - prune: {sparsity: high}", "stage 1, prune, key 'sparsity', line 2", "number"),
    (
        "stages:\n  - prune: {sparsity: 0.5, colour: red}",
        "stage 1, prune, key 'colour'",
        "unknown key",
    ),
    (
        "stages:\n  - prune: {sparsity: 0.5}\n  - polish: {}",
        "stage 2, line 3",
        "unknown stage 'polish'",
    ),
    ("stages:\n  - prune: {pattern: '4:2'}", "stage 1, prune, key 'pattern'", "1 <= N < M"),
    ("stages:\n  - prune: {method: psychic}", "stage 1, prune, key 'method'", "'magnitude'"),
    ("stages:\n  - oneshot: {method: wanda, allocation: lucky}", "key 'allocation'", "'owl'"),
    ("stages:\n  - prune_structured: {target_macs: 0}", "key 'target_macs'", "(0, 1]"),
    ("stages:\n  - prune_structured: {unit: [head, fin]}", "key 'unit'", "'fin'"),
    ("stages:\n  - prune_structured: {target_latency: 3}", "key 'target_latency'", "[0, 1)"),
    ("stages:\n  - oneshot: {pattern: 'block:4x4'}", "stage 1, oneshot, key 'pattern'", "N:M"),
    ("stages:\n  - finetune: {epochs: 0}", "stage 1, finetune, key 'epochs'", ">= 1"),
    ("stages:\n  - finetune: {teacher: bert}", "key 'teacher'", "'dense'"),
    ("stages:\n  - finetune: {lr: fast}", "stage 1, finetune, key 'lr'", "'auto'"),
    ("stages:\n  - finetune: {loss_fn: ce}", "key 'loss_fn'", "given to prunekit.compress"),
    ("stages:\n  - quantize: {bits: 7}", "stage 1, quantize, key 'bits'", "8"),
    ("stages:\n  - quantize: {mode: float}", "key 'mode'", "'int'"),
    ("stages:\n  - save: {bits: {'*': [3, 'group:8']}}", "stage 1, save, key 'bits'", "bits=3"),
    (
        "stages:\n  - save: {}\n  - prune: {sparsity: 0.5}",
        "stage 2, prune, line 3",
        "save must be last",
    ),
    (
        "stages:\n  - quantize: {bits: 8}\n  - finetune: {teacher: dense}",
        "stage 2, finetune",
        "off the quantization grid",
    ),
    (
        "stages:\n  - prune: {sparsity: 0.5}\n  - prune_structured: {ratio: 0.5}",
        "stage 2, prune_structured",
        "put prune_structured first",
    ),
    ("stages:\n  - prune: [0.5]", "stage 1, prune", "must be a mapping"),
    ("stages:\n  - {prune: {}, save: {}}", "stage 1", "one mapping"),
    (
        "stages:\n  - save: {}\nmeasure: {batch_sizes: [0]}",
        "key 'measure.batch_sizes'",
        "positive integers",
    ),
    ("stages: [save]\ncolour: 3", "key 'colour'", "unknown key"),
    ("stages: [save]\nmeasure: {batch_sizes: []}", "key 'measure.batch_sizes'", "at least one"),
    # one message for a value that cannot be searched, not also a type error about a stand-in
    (
        "goal: {file: 0.5}\nstages:\n  - quantize: {bits: search}",
        "stage 1, quantize, key 'bits', line 3",
        "cannot be searched",
    ),
    # an N:M pattern fixes the sparsity: the verb refuses another one, so the recipe does
    (
        "stages:\n  - prune: {pattern: '2:4', sparsity: 0.7}",
        "stage 1, prune, key 'sparsity', line 2",
        "fixes the sparsity at 0.5",
    ),
    (
        "stages:\n  - oneshot: {method: wanda, pattern: '2:4', sparsity: 0.6}",
        "stage 1, oneshot, key 'sparsity'",
        "leave sparsity out",
    ),
    (
        "goal: {file: 0.5}\nstages:\n  - prune: {pattern: '1:4', sparsity: search}",
        "stage 1, prune, key 'sparsity', line 3",
        "cannot be searched with pattern '1:4'",
    ),
    # depth pruning refuses these when its stage comes up: the recipe is refused when read
    (
        "stages:\n  - prune_structured: {unit: layer, target_latency: 0.5, target_params: 0.5}",
        "stage 1, prune_structured, key 'target_params', line 2",
        "takes no target_params",
    ),
    (
        "stages:\n  - prune_structured:\n      unit: layer\n      round_to: 8",
        "stage 1, prune_structured, key 'round_to', line 4",
        "does not use round_to",
    ),
    # prune_structured ignores ratio when a target is given: a recipe with both is refused
    (
        "stages:\n  - prune_structured: {ratio: 0.5, target_macs: 0.5}",
        "stage 1, prune_structured, key 'ratio', line 2",
        "ignored when target_macs is given",
    ),
    (
        "stages:\n  - prune_structured:\n      target_params: 0.4\n      ratio: 0.3",
        "stage 1, prune_structured, key 'ratio', line 4",
        "ignored when target_params is given",
    ),
    (
        "goal: {macs: 0.5}\nstages:\n  - prune_structured: {ratio: search, target_latency: 0.5}",
        "stage 1, prune_structured, key 'ratio', line 3",
        "cannot be searched with target_latency",
    ),
    (
        "stages:\n  - prune_structured: {target_latency: 0.5, target_macs: 0.5}",
        "stage 1, prune_structured, key 'target_latency', line 2",
        "not both",
    ),
    ("stages:\n  - prune: {sparsity: 0.5\n", "line", "not valid YAML"),
    ("{not json", "line", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "place", "says"), BAD_RECIPES)
def test_every_bad_recipe_gets_one_clear_error_with_its_place(text, place, says, tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as err:
        compress(nn.Linear(4, 4), path, out=out, progress=False)
    assert len(err.value.problems) == 1, err.value.problems
    message = err.value.problems[0]
    assert place in message and says in message, message
    assert str(path) in str(err.value)
    assert not out.exists()  # nothing written


def test_all_problems_are_reported_at_once() -> None:
    text = "stages:\n  - prune: {sparsity: 2}\n  - quantize: {bits: 3}\n  - polish: {}\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(text)
    places = [p.split(":")[0] for p in err.value.problems]
    assert places == [
        "stage 1, prune, key 'sparsity', line 2",
        "stage 2, quantize, key 'bits', line 3",
        "stage 3, line 4",
    ]


def test_missing_inputs_are_named_before_anything_runs(tmp_path) -> None:
    with pytest.raises(RecipeError) as err:
        compress(nn.Linear(4, 4), GOOD, out=tmp_path / "run", progress=False)
    assert err.value.problems == [
        "stage 2, finetune: needs data= (fine-tuning trains on batches), which was not given"
    ]
    assert not (tmp_path / "run").exists()
    with pytest.raises(RecipeError, match="needs calib="):
        compress(nn.Linear(4, 4), "llm-2of4-int8", out=tmp_path / "run", progress=False)
    with pytest.raises(RecipeError, match="needs out="):
        compress(nn.Linear(4, 4), {"stages": ["save"]}, progress=False)


def test_a_shipped_recipe_is_named_by_its_name_not_its_installed_path() -> None:
    with pytest.raises(RecipeError) as err:
        compress(nn.Linear(4, 4), "llm-2of4-int8", progress=False)
    message = str(err.value)
    assert message.startswith("recipe llm-2of4-int8: 2 problems"), message
    assert "builtin" not in message and ".yaml" not in message
    recipe = load_recipe("cnn-small")
    assert (recipe.source, recipe.name) == ("cnn-small", "cnn-small")


def test_a_missing_path_that_ends_in_a_shipped_name_is_not_the_shipped_recipe(tmp_path) -> None:
    with pytest.raises(RecipeError, match="no such file, and not a shipped recipe"):
        load_recipe(str(tmp_path / "cnn-small"))


def test_layer_patterns_that_match_nothing_are_named_before_anything_runs(tmp_path) -> None:
    """targets / ignore / per_layer patterns and a save's bits patterns are checked against
    the model before the dense model is measured, every stage at once, each with its place;
    nothing is written."""
    recipe = {
        "stages": [
            {"prune": {"sparsity": 0.5, "targets": ["embeddings.word_embeddings"]}},
            {"prune": {"sparsity": 0.6, "ignore": ["*.attn"]}},
            {"prune": {"sparsity": 0.7, "per_layer": {"fc9": 0.9}}},
            {"prune": {"sparsity": 0.8, "targets": ["fc1"]}},  # fine
            {"quantize": {"bits": 8, "ignore": ["lm_head"]}},
            {"save": {"compressed": True, "bits": {"*word_embeddings*": 4, "*": 8}}},
        ],
        "measure": {"latency": False},
    }
    calls = []

    def evaluate(model):
        calls.append(model)
        return 1.0

    with pytest.raises(RecipeError) as err:
        compress(SmallCNN(), recipe, evaluate=evaluate, out=tmp_path / "run", progress=False)
    places = [p.split(":")[0] for p in err.value.problems]
    assert places == [
        "stage 1, prune",
        "stage 2, prune",
        "stage 3, prune",
        "stage 5, quantize",
        "stage 6, save",
    ]
    assert "bits pattern '*word_embeddings*' matches no weight" in err.value.problems[4]
    assert "'embeddings.word_embeddings' matches no prunable layer" in err.value.problems[0]
    assert "conv1, conv2, fc1, head" in err.value.problems[0]  # what is accepted
    assert "per_layer pattern 'fc9'" in err.value.problems[2]
    assert not calls and not (tmp_path / "run").exists()


def test_the_same_recipe_from_every_source(tmp_path) -> None:
    yaml_text = (
        "stages:\n  - prune: {sparsity: 0.5}\n  - finetune: {teacher: dense, epochs: 1}\n"
        "  - quantize: {bits: 8, mode: int}\n  - save: {compressed: true}\n"
    )
    (tmp_path / "r.yaml").write_text(yaml_text)
    (tmp_path / "r.json").write_text(json.dumps(GOOD))
    sources = [GOOD, yaml_text, json.dumps(GOOD), tmp_path / "r.yaml", str(tmp_path / "r.json")]
    stages = [[(s.verb, s.kwargs) for s in load_recipe(src).stages] for src in sources]
    assert all(s == stages[0] for s in stages)
    assert load_recipe("stages: [{finetune: {lr: auto}}]").stages[0].kwargs == {"lr": "auto"}
    assert [s.fingerprint() for s in load_recipe(GOOD).stages] == [
        s.fingerprint() for s in load_recipe(yaml_text).stages
    ]


def test_shipped_recipes_are_listed_and_valid() -> None:
    names = list_recipes()
    assert {"cnn-small", "llm-2of4-int8", "encoder-small"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.stages[-1].verb == "save" and recipe.name == name
    with pytest.raises(RecipeError, match="not a shipped recipe"):
        load_recipe("no-such-recipe")


def test_keywords_follow_the_verbs_signatures() -> None:
    """A new keyword of a verb is accepted by recipes without any change here."""
    import inspect

    params = inspect.signature(prunekit.quantize).parameters
    assert set(STAGES["quantize"].parameters()) == {
        n for n in list(params)[1:] if n not in ("inplace",)
    }


# ------------------------------------------------------------------------------ running


def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 1, 8, 8, generator=g)
    teacher = SmallCNN()
    with torch.no_grad():
        y = teacher(x).argmax(1)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]
    return teacher, batches


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


FAST = dict(GOOD, measure={"batch_sizes": [1, 4], "repeats": 3})  # latency measured too


def test_pipeline_measures_every_stage(tmp_path) -> None:
    torch.manual_seed(0)
    model, batches = _task()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = compress(
        model,
        FAST,
        data=batches,
        loss_fn=_ce,
        evaluate=metrics.accuracy(batches),
        example_inputs=batches[0][0][:1],
        out=tmp_path / "run",
        progress=False,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not in place
    result = report.model
    weights = [result.conv1.weight, result.conv2.weight, result.fc1.weight]
    n = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    # the pruned half stays zero through finetune; int8 may round a few tiny weights to zero too
    assert round(0.5 * n) <= zeros <= round(0.5 * n) + n // 500
    after_prune = report.stages[0].metrics["nonzeros"]
    assert report.stages[1].metrics["nonzeros"] == after_prune  # finetune keeps the mask
    rows = report.rows()
    assert [r["stage"] for r in rows] == [
        "dense",
        "01-prune",
        "02-finetune",
        "03-quantize",
        "04-save",
    ]
    nonzeros = sum(int(torch.count_nonzero(p)) for p in result.parameters())
    assert rows[-1]["nonzeros"] == nonzeros
    assert rows[-1]["params"] == sum(p.numel() for p in model.parameters())
    saved = tmp_path / "run" / "model"
    assert rows[-1]["file_bytes"] == sum(f.stat().st_size for f in saved.iterdir())
    assert rows[0]["quality"] == pytest.approx(1.0)  # labels are the dense model's argmax
    assert rows[-1]["quality"] == metrics.accuracy(batches)(result)
    assert rows[-1]["macs"] == prunekit.count(result, batches[0][0][:1]).macs
    assert set(report.stages[-1].metrics["latency"]) == {"1", "4"}
    # the reloaded folder gives the same model as the one returned
    again = prunekit.load(saved, SmallCNN())
    x = batches[0][0]
    assert torch.equal(again(x), result(x))
    # quantized to int8: at most 255 distinct values per output channel
    assert all(len(torch.unique(row)) <= 255 for row in result.fc1.weight)


def test_the_quantize_stage_counts_the_weights_the_grid_rounded_to_zero() -> None:
    # Row 0 of fc1 gets a scale of 100 / 127: its other pruned-and-kept weights round to 0. The
    # quantize row, and the layer table of the quantize stage, count the model after rounding.
    model = SmallCNN()
    with torch.no_grad():
        model.fc1.weight[0, 0] = 100.0
    recipe = {
        "stages": [{"prune": {"sparsity": 0.5, "scope": "local"}}, {"quantize": {"bits": 8}}],
        "measure": {"latency": False},
    }
    report = compress(model, recipe, progress=False)
    pruned, quantized = (stage.metrics["nonzeros"] for stage in report.stages)
    assert quantized < pruned  # the rounding made zeros
    assert quantized == sum(int(torch.count_nonzero(p)) for p in report.model.parameters())
    zeros = int((report.model.fc1.weight == 0).sum())
    assert re.search(rf"fc1\.weight .* {zeros:,} +[1-9]\d* +yes", report.stages[1].summary)


class _Timed:
    """A bench row of synthetic timings: only the quartiles and the median are read."""

    def __init__(self, median: float, p25: float, p75: float) -> None:
        self.median_ms, self.p25_ms, self.p75_ms = median, p25, p75


def test_noisy_latency_is_flagged_in_the_table_and_the_report(monkeypatch) -> None:
    from prunekit.analysis.pipeline_report import NOISY_SPREAD, html_page, markdown
    from prunekit.recipes.measure import MeasureSettings, latency
    from prunekit.recipes.runner import CompressReport, StageResult

    timings = {  # (model, batch): median, quartiles; nothing is timed
        ("model", 1): _Timed(1.0, 0.8, 1.2),  # spread 40 % of the median: noisy
        ("dense", 1): _Timed(2.0, 1.98, 2.02),
        ("model", 4): _Timed(3.0, 2.97, 3.03),  # 2 %: quiet
        ("dense", 4): _Timed(6.0, 5.94, 6.06),
    }

    class FakeReport:
        def row(self, model: str, batch: int) -> _Timed:
            return timings[model, batch]

    bench_module = sys.modules["prunekit.runtime.bench"]  # prunekit.runtime.bench: the function
    monkeypatch.setattr(bench_module, "bench", lambda *args, **kwargs: FakeReport())
    settings = MeasureSettings(batch_sizes=[1, 4], repeats=10)
    measured = latency(nn.Linear(2, 2), nn.Linear(2, 2), torch.zeros(1, 2), settings)
    assert measured["1"]["spread"] == pytest.approx(0.4)
    assert measured["1"]["dense_spread"] == pytest.approx(0.02)
    assert measured["4"]["spread"] == pytest.approx(0.02) and 0.02 < NOISY_SPREAD

    def report_with(lat: dict) -> CompressReport:
        dense = {"params": 6, "nonzeros": 6, "fp32_bytes": 100, "file_bytes": 100}
        metrics = {**dense, "latency": lat}
        recipe = load_recipe({"stages": [{"prune": {"sparsity": 0.5}}]})
        stage = StageResult("01-prune", "prune", {"sparsity": 0.5}, 0.1, metrics)
        return CompressReport(
            nn.Linear(2, 2), recipe, dense, [stage], settings={"torch_threads": 1}
        )

    noisy = report_with(measured)
    table = str(noisy)
    row = next(line for line in table.splitlines() if line.startswith("01-prune"))
    assert "~1.00 ms (0.50x)" in row and "~3.00 ms" not in row  # only batch 1 is marked
    note = "over 10% of their median (01-prune b1: 40%)"
    assert note in table
    assert note in markdown(noisy) and note in html_page(noisy, {})
    assert noisy.rows()[1]["latency_b1_spread"] == pytest.approx(0.4)
    quiet = report_with({"4": measured["4"]})
    assert "~" not in str(quiet) and "noisy" not in markdown(quiet)
    older = report_with({"1": {"ms": 1.0, "dense_ms": 2.0, "ratio": 0.5}})  # no spread recorded
    assert "noisy" not in str(older)


def _stage_report(points: list[tuple[float, float, float]], threads: int = 1):
    """A report whose stages sit at (file fraction, latency ratio, quality); nothing runs."""
    from prunekit.recipes.runner import CompressReport, StageResult

    dense = {"params": 6, "nonzeros": 6, "fp32_bytes": 1000, "file_bytes": 1000, "quality": 0.99}
    verbs = ["prune_structured", "prune", "finetune", "quantize", "save", "prune", "finetune"]
    stages = []
    for i, (file, ratio, quality) in enumerate(points, 1):
        metrics = {
            **dense,
            "file_bytes": int(file * 1000),
            "quality": quality,
            "latency": {"1": {"ms": ratio, "dense_ms": 1.0, "ratio": ratio}},
        }
        verb = verbs[i - 1]
        stages.append(StageResult(f"{i:02d}-{verb}", verb, {}, 0.1, metrics))
    recipe = load_recipe({"stages": [{"prune": {"sparsity": 0.5}}]})
    return CompressReport(
        nn.Linear(2, 2), recipe, dense, stages, settings={"torch_threads": threads}
    )


def test_the_thread_count_in_the_report_is_spelt_right() -> None:
    one = str(_stage_report([(0.5, 0.5, 0.9)], threads=1))
    assert "dense timed in the same call, 1 thread" in one and "1 threads" not in one
    assert "2 threads" in str(_stage_report([(0.5, 0.5, 0.9)], threads=2))


def test_quality_plot_labels_do_not_overlap(monkeypatch) -> None:
    """Stages that land on (nearly) the same point share one label; the legend names them all."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from prunekit.analysis.pipeline_report import plots

    labels: list[tuple[Axes, str, tuple[float, float]]] = []
    legends: list[str] = []
    annotate, legend = Axes.annotate, Figure.legend

    def spy(self, text, xy, *args, **kwargs):
        labels.append((self, str(text), xy))
        return annotate(self, text, xy, *args, **kwargs)

    def spy_legend(self, *args, **kwargs):
        made = legend(self, *args, **kwargs)
        legends.extend(t.get_text() for t in made.get_texts())
        return made

    monkeypatch.setattr(Axes, "annotate", spy)
    monkeypatch.setattr(Figure, "legend", spy_legend)
    # as in a cnn-small run: pruning far off, then four stages on top of each other
    report = _stage_report(
        [
            (0.93, 0.71, 0.98),
            (0.13, 0.95, 0.9705),
            (0.13, 0.95, 0.99),
            (0.05, 0.94, 0.99),
            (0.06, 0.93, 0.99),
        ]  # fmt: skip
    )
    assert "tradeoff" in plots(report)
    axes = list(dict.fromkeys(ax for ax, _, _ in labels))
    assert len(axes) == 2  # file size, latency at batch 1
    for ax in axes:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        placed = [
            ((x - x0) / (x1 - x0), (y - y0) / (y1 - y0), text)
            for a, text, (x, y) in labels
            if a is ax
        ]
        for i, (xa, ya, ta) in enumerate(placed):
            for xb, yb, tb in placed[i + 1 :]:
                assert abs(xa - xb) > 0.05 or abs(ya - yb) > 0.05, (ta, tb)
        numbers = set()
        for _, _, text in placed:
            for part in text.split(","):
                low, _, high = part.partition("-")
                numbers.update(range(int(low), int(high or low) + 1))
        assert numbers == {0, 1, 2, 3, 4, 5}, placed  # every stage is labelled, dense is 0
    assert legends[:6] == ["0 dense", "1 prune_structured", "2 prune", "3 finetune",
                           "4 quantize", "5 save"]  # fmt: skip


def test_report_files_are_written_and_self_contained(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model, batches = _task()
    report = compress(
        model,
        FAST,
        data=batches,
        loss_fn=_ce,
        evaluate=metrics.accuracy(batches),
        example_inputs=batches[0][0][:1],
        out=tmp_path / "run",
        progress=False,
    )
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["stage"] for r in data["table"]] == [r["stage"] for r in report.rows()]
    assert data["table"][-1]["nonzeros"] == report.rows()[-1]["nonzeros"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "| stage |" in md and "04-save" in md
    page = (tmp_path / "run" / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"]https?:", page)  # opens with no network
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == 2
    import matplotlib.image

    for encoded in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded)), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01  # not a blank canvas
    assert "02-finetune" in str(report) and "dense" in str(report)


def test_report_json_lists_the_report_files(tmp_path) -> None:
    recipe = {"stages": [{"prune": {"sparsity": 0.5}}], "measure": {"latency": False}}
    report = compress(SmallCNN(), recipe, out=tmp_path / "run", progress=False)
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["files"] == report.files
    assert sorted(report.files) == ["html", "json", "md"]
    assert all(Path(path).is_file() for path in report.files.values())


def test_accuracy_takes_a_dataset_or_one_pair_as_well_as_batches() -> None:
    """A map-style Dataset is batched (listing it would run single samples without their batch
    dimension) and one (inputs, labels) pair is one batch; anything else is refused, saying
    what is accepted."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = torch.randn(300, 1, 8, 8), torch.randint(0, 10, (300,))
    expected = metrics.accuracy([(x[:150], y[:150]), (x[150:], y[150:])])(model)
    dataset = TensorDataset(x, y)
    assert metrics.accuracy(dataset)(model) == expected
    assert metrics.accuracy((x, y))(model) == expected
    assert metrics.accuracy(DataLoader(dataset, batch_size=64))(model) == expected
    with pytest.raises(ValueError, match="item 0 is a Tensor.*map-style Dataset"):
        metrics.accuracy([x])


def test_a_loss_module_as_loss_fn_is_refused_before_anything_runs(tmp_path) -> None:
    """loss_fn is loss_fn(model, batch); nn.CrossEntropyLoss() would fail only in the finetune
    stage, after the dense model was measured and the stages before it ran."""
    model, batches = _task()
    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\).*CrossEntropyLoss"):
        compress(model, GOOD, data=batches, loss_fn=nn.CrossEntropyLoss(), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_teacher_dense_is_the_model_before_the_first_stage(tmp_path, monkeypatch) -> None:
    model, batches = _task()
    seen = {}
    real = STAGES["finetune"].verb

    def spy_verb():
        fn = real()

        @functools.wraps(fn)
        def wrapped(m, data, loss_fn, teacher=None, **kw):
            seen["teacher"] = {k: v.clone() for k, v in teacher.state_dict().items()}
            seen["student_zeros"] = int((m.conv1.weight == 0).sum())
            return fn(m, data, loss_fn, teacher=teacher, **kw)

        return wrapped

    monkeypatch.setattr(STAGES["finetune"], "verb", spy_verb)
    compress(model, GOOD, data=batches, loss_fn=_ce, out=tmp_path / "r", progress=False)
    assert all(torch.equal(seen["teacher"][k], v) for k, v in model.state_dict().items())
    assert seen["student_zeros"] > 0


def _final_state(report) -> dict[str, torch.Tensor]:
    from prunekit.compress.io import effective_state

    return {k: v.clone() for k, v in effective_state(report.model)[0].items()}


def test_rerun_resumes_and_a_changed_stage_reruns_from_there(tmp_path, capsys) -> None:
    model, batches = _task()
    kwargs = dict(data=batches, loss_fn=_ce, out=tmp_path / "run")
    first = compress(model, GOOD, progress=False, **kwargs)
    again = compress(model, GOOD, progress=True, **kwargs)
    assert [s.resumed for s in again.stages] == [True] * 4
    a, b = _final_state(first), _final_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "resuming after stage 4" in capsys.readouterr().out

    changed = json.loads(json.dumps(GOOD))
    changed["stages"][1]["finetune"]["epochs"] = 2
    third = compress(model, changed, progress=True, **kwargs)
    assert [s.resumed for s in third.stages] == [True, False, False, False]
    out = capsys.readouterr().out
    assert "stage 2 (finetune) differs from the checkpoint" in out
    assert "stages 2.. run again" in out
    record = json.loads((tmp_path / "run" / "stages" / "02-finetune" / "stage.json").read_text())
    assert record["kwargs"] == {"teacher": "dense", "epochs": 2}


def test_changed_inputs_rerun_the_stages_that_use_them(tmp_path, capsys) -> None:
    model, batches = _task()
    calib = [b[0] for b in batches[:2]]
    recipe = {
        "stages": [
            {"oneshot": {"method": "wanda", "sparsity": 0.5}},
            {"finetune": {"teacher": "dense", "epochs": 1}},
        ],
        "measure": {"latency": False},
    }
    kwargs = dict(loss_fn=_ce, out=tmp_path / "run", progress=True)
    compress(model, recipe, calib=calib, data=batches, **kwargs)
    capsys.readouterr()

    other_batches = [(x + 0.5, y) for x, y in batches]  # same shapes, other values
    second = compress(model, recipe, calib=calib, data=other_batches, **kwargs)
    assert [s.resumed for s in second.stages] == [True, False]  # oneshot uses no training data
    assert "stage 2 (finetune) differs from the checkpoint" in capsys.readouterr().out

    other_calib = [x * 2 for x in calib]
    third = compress(model, recipe, calib=other_calib, data=other_batches, **kwargs)
    assert [s.resumed for s in third.stages] == [False, False]
    assert "calibration data (calib=) changed" in capsys.readouterr().out

    again = compress(model, recipe, calib=[x * 2 for x in calib], data=other_batches, **kwargs)
    assert [s.resumed for s in again.stages] == [True, True]


def test_input_fingerprints_hash_values_and_leave_iterators_unread() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from prunekit.recipes.fingerprint import input_fingerprint, what_changed

    x = torch.arange(12.0).reshape(6, 2)
    assert input_fingerprint([x, {"a": 1}]) == input_fingerprint([x.clone(), {"a": 1}])
    assert input_fingerprint([x]) != input_fingerprint([x + 1])
    assert input_fingerprint([x]) != input_fingerprint([x.double()])
    loader = DataLoader(TensorDataset(x), batch_size=2)
    assert input_fingerprint(loader) == input_fingerprint(DataLoader(TensorDataset(x.clone()), 2))
    assert input_fingerprint(loader) != input_fingerprint(DataLoader(TensorDataset(x + 1), 2))
    assert input_fingerprint(loader) != input_fingerprint(DataLoader(TensorDataset(x), 3))

    # tokenizer outputs are mappings without being dicts; numpy arrays are read by value
    from collections import UserDict

    assert input_fingerprint([UserDict(ids=x)]) != input_fingerprint([UserDict(ids=x + 1)])
    assert input_fingerprint([x.numpy()]) != input_fingerprint([(x + 1).numpy()])

    read = []

    def batches():
        read.append(1)
        yield x

    generator = batches()
    input_fingerprint(generator)
    assert read == [] and next(generator) is x  # not consumed
    assert what_changed({"model": "a", "seed": "0"}, {"model": "b", "seed": "0"}) == (
        "input model changed"
    )
    assert "recipe" in what_changed(None, {"model": "a"})  # checkpoint from an older prunekit


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch import nn
    from safetensors.torch import save_file
    sys.path.insert(0, {tests!r})
    from conftest import SmallCNN
    import prunekit
    from prunekit.compress.io import effective_state

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SmallCNN()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    marker = os.environ.get("KILL_MARKER")

    class Batches:
        def __init__(self):
            self.epoch = 0
        def __iter__(self):
            self.epoch += 1
            for i in range(0, 96, 16):
                if marker and self.epoch == 2 and i == 48:
                    open(marker, "w").close()
                    time.sleep(120)  # killed here, in the middle of stage 2
                yield x[i : i + 16], y[i : i + 16]

    recipe = {{"stages": [
        {{"prune": {{"sparsity": 0.6}}}},
        {{"finetune": {{"teacher": "dense", "epochs": 3, "lr": 0.003}}}},
        {{"quantize": {{"bits": 8, "mode": "int"}}}},
        {{"save": {{"compressed": True}}}},
    ], "measure": {{"latency": False}}}}
    ce = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    report = prunekit.compress(model, recipe, data=Batches(), loss_fn=ce, out=sys.argv[1],
                               progress=False)
    print("RESUMED", [s.resumed for s in report.stages])
    save_file(effective_state(report.model)[0], sys.argv[2])
    """
)


def test_killed_run_resumes_to_the_same_weights(tmp_path) -> None:
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "PYTHONPATH": str(Path(prunekit.__file__).parents[1])}
    marker = tmp_path / "in-stage-2"
    victim = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "killed"), str(tmp_path / "never.st")],
        env={**env, "KILL_MARKER": str(marker)},
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert victim.poll() is None, "the run ended before reaching stage 2"
        assert time.monotonic() < deadline, "stage 2 never started"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    stages = tmp_path / "killed" / "stages"
    assert sorted(p.name for p in stages.iterdir() if not p.name.startswith(".")) == ["01-prune"]

    for folder, target in (("killed", "resumed.st"), ("clean", "clean.st")):
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path / folder), str(tmp_path / target)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        expected = "[True, False, False, False]" if folder == "killed" else "[False] * 4"
        if folder == "killed":
            assert f"RESUMED {expected}" in done.stdout
    resumed, clean = load_file(tmp_path / "resumed.st"), load_file(tmp_path / "clean.st")
    assert resumed.keys() == clean.keys()
    assert all(torch.equal(resumed[k], clean[k]) for k in clean)
    assert not any(p.name.startswith(".") for p in (tmp_path / "killed" / "stages").iterdir())


def test_run_folder_holds_no_pickle(tmp_path) -> None:
    """Checkpoints and outputs are safetensors + JSON (and the report's text files) only."""
    model, batches = _task()
    compress(model, GOOD, data=batches, loss_fn=_ce, out=tmp_path / "run", progress=False)
    suffixes = {p.suffix for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json", ".md", ".html"}
