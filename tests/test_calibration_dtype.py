"""``oneshot(calibration_dtype=...)``: block forwards under bfloat16 autocast, statistics in
full precision from the upcast inputs, the default path untouched.

* bfloat16 gives masks with exactly the asked sparsity and a pruned model close to float32's;
* the statistics are float32 / float64 and equal those computed by hand from the layers'
  actual (upcast) inputs, with autocast off inside the hooks;
* ``"float32"`` and ``torch.float32`` give the same bits, and never enter autocast; so does the
  default ``"auto"`` (or None) on a CPU without native bfloat16, while on one with it (and on a
  bfloat16 GPU) "auto" autocasts a float32 model to bfloat16 and leaves other dtypes alone;
* bad values raise before anything changes; slow-bfloat16 CPUs are warned about once;
* stacked block calls still happen under bfloat16 (block calls counted);
* the dtype reaches the report, the checkpoint fingerprint, the CLI, recipes and streaming.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import tiny_llama
from prunekit.calibrate import precision
from prunekit.calibrate.oneshot import oneshot
from prunekit.calibrate.sequential import run_sequential
from prunekit.calibrate.stats import InputStats
from prunekit.masks import get_mask
from prunekit.scope import count_to_remove
from prunekit.targets import Target

transformers = pytest.importorskip("transformers")

N_SAMPLES, TOKENS = 8, 16


def _model():
    return tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _calib(n: int = N_SAMPLES, tokens: int = TOKENS) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 64, (1, tokens), generator=g)} for _ in range(n)]


def _linears(model, block: int | None = None) -> list[tuple[str, torch.nn.Linear]]:
    prefix = "model.layers." if block is None else f"model.layers.{block}."
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(prefix)
    ]


def _prune(dtype, method="wanda", pattern="unstructured", sparsity=0.5, **kwargs):
    return oneshot(
        _model(),
        _calib(),
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        calibration_dtype=dtype,
        progress=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    "method, pattern, sparsity",
    [
        ("wanda", "unstructured", 0.5),
        ("sparsegpt", "unstructured", 0.6),
        ("sparsegpt", "2:4", None),
    ],
)
def test_bfloat16_gives_exact_sparsity_and_outputs_close_to_float32(
    one_thread, method, pattern, sparsity
) -> None:
    full = _prune("float32", method, pattern, sparsity)
    half = _prune("bfloat16", method, pattern, sparsity)
    asked = 0.5 if sparsity is None else sparsity
    agree = []
    for (name, layer), (_, ref) in zip(_linears(half.model), _linears(full.model), strict=True):
        keep = get_mask(layer, "weight")
        assert keep is not None, name
        assert int((~keep).sum()) == count_to_remove(asked, keep.numel()), name  # exact count
        if pattern == "2:4":
            assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2), name
        assert layer.weight.dtype == torch.float32  # the weights keep the model's dtype
        agree.append(float((keep == get_mask(ref, "weight")).float().mean()))
    assert min(agree) > 0.9  # the same weights pruned, up to near-ties
    ids = torch.randint(0, 64, (2, TOKENS), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b, dense = half.model(ids).logits, full.model(ids).logits, _model()(ids).logits
    assert a.dtype == torch.float32
    # measured: 0.1 % to 3 % of the logits (SparseGPT 2:4 flips near-ties), while pruning moves
    # them by 16 % to 23 %; the damage of the bfloat16 run is that of the float32 run
    change = float((b - dense).norm())
    assert float((a - b).norm()) < 0.2 * change
    assert float((a - dense).norm()) < 1.05 * change
    assert half.settings["calibration_dtype"] == "bfloat16"
    assert full.settings["calibration_dtype"] == "float32"


def _stats_under(compute_dtype):
    """Block 0's statistics gathered by the sequential runner with ``compute_dtype``, the
    inputs each linear layer actually received, and whether autocast was on at the time."""
    model = _model()
    blocks = model.model.layers
    targets = [Target(n, m) for n, m in _linears(model, 0)]
    seen: dict[str, list[torch.Tensor]] = {t.name: [] for t in targets}
    autocast_on: set[bool] = set()
    collected = {}

    def on_block(index, block, run) -> None:
        if index != 0:
            return
        handles = [
            t.module.register_forward_pre_hook(
                lambda mod, args, name=t.name: (
                    seen[name].append(args[0].detach().clone()),
                    autocast_on.add(torch.is_autocast_enabled("cpu")),
                )[-1]
            )
            for t in targets
        ]
        try:
            with InputStats(targets, {"norm", "hessian"}, keep_parts=True) as stats:
                run()
        finally:
            for h in handles:
                h.remove()
        collected["stats"] = stats

    run_sequential(model, blocks, _calib(), on_block, compute_dtype=compute_dtype)
    return collected["stats"], seen, autocast_on


def test_statistics_are_full_precision_from_the_upcast_inputs(one_thread) -> None:
    stats, seen, autocast_on = _stats_under(torch.bfloat16)
    assert autocast_on == {True}  # the block really ran under autocast
    kinds = {name: {x.dtype for x in xs} for name, xs in seen.items()}
    # o_proj and down_proj read products of the bfloat16 matmuls; q / gate read RMSNorm (float32)
    assert kinds["model.layers.0.self_attn.o_proj.weight"] == {torch.bfloat16}
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == {torch.float32}
    for name, xs in seen.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()  # upcast by hand
        assert stats.hessian_sums[name].dtype == torch.float64
        entry = stats.stats[name]
        assert entry["hessian"].dtype == torch.float32 and entry["norm"].dtype == torch.float32
        expect_h = 2.0 / rows.shape[0] * rows.t() @ rows
        torch.testing.assert_close(entry["hessian"].double(), expect_h, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(entry["norm"].double(), rows.pow(2).sum(0), rtol=1e-5, atol=1e-7)
    # block 0's q / k / v see the same float32 inputs as without autocast: the same bits
    ref, _, ref_autocast = _stats_under(None)
    assert ref_autocast == {False}
    for name in [n for n in seen if ".self_attn." in n and "o_proj" not in n]:
        assert torch.equal(stats.stats[name]["hessian"], ref.stats[name]["hessian"])
        assert torch.equal(stats.stats[name]["norm"], ref.stats[name]["norm"])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_float32_and_auto_without_native_bf16_are_bit_for_bit_and_never_autocast(
    one_thread, method, monkeypatch
) -> None:
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)  # "auto" then means float32
    states = []
    for dtype in ("float32", torch.float32, None, "auto"):
        model = _model()
        entered: set[bool] = set()
        for _, layer in _linears(model):
            layer.register_forward_pre_hook(
                lambda *_, entered=entered: entered.add(torch.is_autocast_enabled("cpu"))
            )
        report = oneshot(
            model,
            _calib(),
            method=method,
            calibration_dtype=dtype,
            inplace=True,
            progress=False,
        )
        assert entered == {False}
        assert report.settings["calibration_dtype"] == "float32"
        states.append(model.state_dict())
    for other in states[1:]:
        assert other.keys() == states[0].keys()
        for key in other:
            assert torch.equal(other[key], states[0][key]), key


def test_whole_model_pass_runs_under_autocast_too(one_thread) -> None:
    """sequential=False (and targets outside the blocks): the whole-model forwards autocast."""
    model = _model()
    entered: list[bool] = []
    for _, layer in _linears(model):
        layer.register_forward_pre_hook(lambda *_: entered.append(torch.is_autocast_enabled("cpu")))
    report = oneshot(
        model,
        _calib(),
        method="sparsegpt",
        sequential=False,
        calibration_dtype="bfloat16",
        inplace=True,
        progress=False,
    )
    layers = len(_linears(model))
    # the first call is the up-front check that every target runs (one sample, no statistics)
    assert entered == [False] * layers + [True] * layers * N_SAMPLES
    assert report.sparsity > 0.4


@pytest.mark.parametrize("bad", ["int8", "float64", "fp8", torch.int8, 16, "float16"])
def test_bad_values_raise_before_any_change(bad) -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="calibration_dtype") as info:
        oneshot(model, _calib(2), calibration_dtype=bad, inplace=True, progress=False)
    text = str(info.value)
    if bad == "float16":
        assert "CUDA only" in text and "'bfloat16'" in text
    else:
        assert "'float32', 'bfloat16', 'float16'" in text
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_aliases_name_the_same_dtypes() -> None:
    for value, name in [
        (torch.bfloat16, "bfloat16"),
        ("bf16", "bfloat16"),
        ("BFloat16", "bfloat16"),
        ("torch.float16", "float16"),
        ("fp32", "float32"),
        (None, "auto"),
        ("AUTO", "auto"),
    ]:
        assert precision.calibration_dtype_name(value) == name
    assert precision.resolve_calibration_dtype("float32", "cpu") is None
    assert precision.resolve_calibration_dtype("float16", "cuda") is torch.float16


def test_auto_takes_bfloat16_only_for_float32_models_where_it_is_native(monkeypatch) -> None:
    resolve = precision.resolve_calibration_dtype
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    assert resolve("auto", "cpu", torch.float32) is torch.bfloat16
    assert resolve(None, None) is torch.bfloat16  # None: auto, on the CPU, float32 model
    for other in (torch.float64, torch.float16, torch.bfloat16, None):
        assert resolve("auto", "cpu", other) is None
    assert resolve("auto", "meta") is None  # no native bfloat16 known there
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" never warns: it just stays float32
        assert resolve("auto", "cpu", torch.float32) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve("auto", "cuda", torch.float32) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve("auto", "cuda", torch.float32) is None


def test_default_autocasts_where_bfloat16_is_native(one_thread, monkeypatch) -> None:
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    model = _model()
    entered: set[bool] = set()
    for _, layer in _linears(model):
        layer.register_forward_pre_hook(lambda *_: entered.add(torch.is_autocast_enabled("cpu")))
    report = oneshot(model, _calib(), method="wanda", inplace=True, progress=False)
    assert True in entered  # (the up-front check that every target runs does not autocast)
    assert report.settings["calibration_dtype"] == "bfloat16"
    entered.clear()
    double = oneshot(model.double(), _calib(), method="wanda", inplace=True, progress=False)
    assert (
        entered == {False} and double.settings["calibration_dtype"] == "float64"
    )  # the model's own


def test_slow_bfloat16_cpu_is_warned_about_once(monkeypatch) -> None:
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)
    with pytest.warns(UserWarning, match="slower than in float32"):
        assert precision.resolve_calibration_dtype("bfloat16", "cpu") is torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second time: no warning
        assert precision.resolve_calibration_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setattr(precision, "_warned_slow_bf16", False)
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bfloat16: no warning
        precision.resolve_calibration_dtype("bfloat16", "cpu")
        precision.resolve_calibration_dtype("bfloat16", "cuda")  # not a CPU question


def test_stacking_still_happens_under_bfloat16(one_thread) -> None:
    """Every sample fits one chunk: each block is called once per pass (plus block 0's stacking
    check), not once per sample."""
    counts = {}
    for dtype in (None, "bfloat16"):
        model = _model()
        calls = [0, 0]
        for i, block in enumerate(model.model.layers):
            block.register_forward_pre_hook(
                lambda *_, i=i, calls=calls: calls.__setitem__(i, calls[i] + 1)
            )
        oneshot(
            model, _calib(), method="wanda", calibration_dtype=dtype, inplace=True, progress=False
        )
        counts[dtype] = list(calls)
    # measured [6, 2]: both blocks run once in the up-front check that every target runs;
    # block 0 then three times in the stacking check (two samples stacked, then each alone),
    # once for its statistics, once for its pruned outputs; block 1 once for its statistics.
    # One sample per call would be 8 calls per pass.
    assert counts["bfloat16"] == counts[None]
    assert counts["bfloat16"][1] < N_SAMPLES and counts["bfloat16"][0] < N_SAMPLES


def test_checkpoint_of_another_calibration_dtype_is_refused(one_thread, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    oneshot(_model(), _calib(), checkpoint=folder, calibration_dtype="float32", progress=False)
    with pytest.raises(ValueError, match="calibration_dtype"):
        oneshot(_model(), _calib(), checkpoint=folder, calibration_dtype="bfloat16", progress=False)
    # the float32 run resumes (finished: loads) from its own checkpoint
    oneshot(_model(), _calib(), checkpoint=folder, calibration_dtype="float32", progress=False)


def test_float32_checkpoint_under_the_auto_default(one_thread, tmp_path, monkeypatch) -> None:
    """A checkpoint of a float32 calibration (what earlier releases wrote by default: no
    calibration_dtype in its settings) resumes under "auto" where that means float32, and where
    "auto" means bfloat16 it is refused with the argument that resumes it."""
    folder = tmp_path / "ckpt"
    first = oneshot(_model(), _calib(), checkpoint=folder, calibration_dtype="float32",
                    progress=False)  # fmt: skip
    assert "calibration_dtype" not in json.loads((folder / "oneshot.json").read_text())["settings"]
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: True)  # "auto": bfloat16
    with pytest.raises(ValueError, match=r"calibration_dtype='auto'.*bfloat16 here.*"
                       r"pass calibration_dtype='float32' to resume"):  # fmt: skip
        oneshot(_model(), _calib(), checkpoint=folder, progress=False)
    monkeypatch.setattr(precision, "native_bf16_cpu", lambda: False)  # "auto": float32
    resumed = oneshot(_model(), _calib(), checkpoint=folder, progress=False)
    assert resumed.details["checkpoint"]["resumed_stages"] == 2  # both blocks loaded, none re-run
    assert resumed.settings["calibration_dtype"] == "float32"
    a, b = first.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the other way: an "auto" checkpoint calibrated in bfloat16, resumed where "auto" is float32
    bf16 = tmp_path / "bf16"
    monkeypatch.setattr(precision, "_warned_slow_bf16", True)  # (asked of a "slow" CPU here)
    oneshot(_model(), _calib(), checkpoint=bf16, calibration_dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="pass calibration_dtype='bfloat16' to resume"):
        oneshot(_model(), _calib(), checkpoint=bf16, progress=False)
    with pytest.raises(ValueError, match=r"calibration_dtype: checkpoint 'bfloat16'") as refused:
        oneshot(_model(), _calib(), checkpoint=bf16, calibration_dtype="float32", progress=False)
    assert "to resume it" not in str(refused.value)  # asked explicitly: no hint


def test_recipe_stage_checks_calibration_dtype() -> None:
    from prunekit.recipes.stages import STAGES

    spec = STAGES["oneshot"]
    assert spec.validate({"calibration_dtype": "bfloat16"}) == []
    assert spec.validate({"calibration_dtype": None}) == []
    for alias in ("auto", "AUTO", "bf16", "fp32"):  # what oneshot itself accepts
        assert spec.validate({"calibration_dtype": alias}) == [], alias
    problems = spec.validate({"calibration_dtype": "int8"})
    assert problems and problems[0][0] == "calibration_dtype" and "'bfloat16'" in problems[0][1]


def test_streamed_oneshot_takes_calibration_dtype(one_thread, tmp_path) -> None:
    from prunekit.calibrate.streaming import oneshot_from_pretrained
    from prunekit.masks import finalize

    folder = tmp_path / "llama"
    _model().save_pretrained(folder)
    calib = [s["input_ids"] for s in _calib()]
    summary = oneshot_from_pretrained(
        folder,
        calib,
        tmp_path / "out",
        method="sparsegpt",
        calibration_dtype="bfloat16",
        progress=False,
    )
    assert summary["calibration_dtype"] == "bfloat16"
    streamed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    whole = oneshot(
        dense, _calib(), method="sparsegpt", calibration_dtype="bfloat16", progress=False
    ).model
    finalize(whole, inplace=True)
    up = streamed.model.layers[1].mlp.up_proj.weight
    assert float((up == 0).float().mean()) == 0.5
    ids = calib[0]
    with torch.no_grad():
        a, b = streamed(ids).logits, whole(ids).logits
    assert float((a - b).norm() / b.norm()) < 1e-2
    with pytest.raises(ValueError, match="CUDA only"):
        oneshot_from_pretrained(folder, calib, tmp_path / "o2", calibration_dtype="float16")


def test_cli_flag(llama_dir, tmp_path, capsys) -> None:
    import json

    from cli_models import llama_with_plain_tokenizer
    from prunekit.cli import main

    pytest.importorskip("tokenizers")
    folder, text = llama_with_plain_tokenizer(llama_dir, tmp_path, 2000)
    base = ["oneshot", str(folder), "--calib", str(text), "--n-samples", "4", "--seq-len", "16"]
    out = tmp_path / "sparse"
    assert main([*base, "--calibration-dtype", "bfloat16", "--out", str(out)]) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["settings"]["calibration_dtype"] == "bfloat16"
    capsys.readouterr()
    assert main([*base, "--calibration-dtype", "int8", "--out", str(tmp_path / "x")]) == 2
    assert "bfloat16" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: blocks move to the GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_blocks_autocast_to_the_asked_dtype(dtype) -> None:
    model = _model()
    entered: list[tuple[bool, str]] = []
    for _, layer in _linears(model):
        layer.register_forward_pre_hook(
            lambda mod, args: entered.append(
                (torch.is_autocast_enabled("cuda"), args[0].device.type)
            )
        )
    half = oneshot(
        model,
        _calib(),
        method="sparsegpt",
        device="cuda",
        calibration_dtype=dtype,
        inplace=True,
        progress=False,
    )
    assert (True, "cuda") in entered and half.settings["calibration_dtype"] == dtype
    full = oneshot(
        _model(),
        _calib(),
        method="sparsegpt",
        device="cuda",
        calibration_dtype="float32",
        progress=False,
    )
    ids = torch.randint(0, 64, (2, TOKENS), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b, dense = half.model(ids).logits, full.model(ids).logits, _model()(ids).logits
    assert next(half.model.parameters()).device.type == "cpu"
    change = float((b - dense).norm())
    assert float((a - b).norm()) < 0.2 * change


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: blocks move to the GPU")
def test_cuda_default_calibrates_in_bfloat16_where_supported() -> None:
    model = _model().cuda()
    entered: list[bool] = []
    for _, layer in _linears(model):
        layer.register_forward_pre_hook(
            lambda *_: entered.append(torch.is_autocast_enabled("cuda"))
        )
    report = oneshot(model, _calib(), method="wanda", inplace=True, progress=False)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert report.settings["calibration_dtype"] == expected
    assert (True in entered) == (expected == "bfloat16")
    assert report.zeros == pytest.approx(0.5 * report.params, abs=len(report.layers))
