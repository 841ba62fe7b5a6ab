"""prune_structured(reconstruct=...): the layers that read removed units are refit on data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import prunekit.graph as pg
from prunekit.graph.importance import GroupImportance
from prunekit.graph.reconstruct import ReconstructConfig, refit

pytestmark = pytest.mark.usefixtures("one_thread")


class FirstUnitsFirst(GroupImportance):
    """Scores 0, 1, 2, ...: the first units of every group are the ones removed."""

    name = "first_units_first"

    def score(self, group, ctx):
        return np.arange(group.n_units, dtype=np.float64)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


def _data(n: int = 4, rows: int = 64, dim: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g) for _ in range(n)]


def _err(a: nn.Module, b: nn.Module, batches: list) -> float:
    with torch.no_grad():
        return float(sum(((a(x) - b(x)) ** 2).mean() for x in batches))


def _prune(model, calib, reconstruct, **kw):
    kw = {"ratio": 0.25, "round_to": 1, "progress": False, "measure_latency": False, **kw}
    return pg.prune_structured(model, calib[0][:1], calib=calib, reconstruct=reconstruct, **kw)


def test_bias_compensation_is_exact_when_removed_inputs_are_constant() -> None:
    model = _mlp()
    with torch.no_grad():  # hidden units 0..3 output the constant 0.5 (after ReLU) on any input
        model[0].weight[:4] = 0.0
        model[0].bias[:4] = 0.5
    calib = _data()
    plain = _prune(model, calib, None, importance=FirstUnitsFirst()).model
    fixed = _prune(model, calib, "bias", importance=FirstUnitsFirst()).model
    assert fixed[0].out_features == 12
    assert _err(plain, model, calib) > 1e-6  # removing them does change the output ...
    for x in _data(seed=7):  # ... and the bias takes it back exactly, on unseen inputs too
        torch.testing.assert_close(fixed(x), model(x), rtol=1e-5, atol=1e-6)


def test_lstsq_refit_matches_torch_lstsq() -> None:
    model = _mlp()
    calib = _data()
    report = _prune(model, calib, ReconstructConfig("lstsq", damp=0.0))
    pruned = report.model
    kept = [
        i
        for i in range(16)
        if any(torch.equal(model[0].weight[i], pruned[0].weight[j]) for j in range(12))
    ]
    assert len(kept) == 12
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for x in calib]).double()
        target = model[2](hidden.float()).double()
        design = torch.cat([hidden[:, kept], torch.ones(len(hidden), 1, dtype=hidden.dtype)], 1)
        ref = torch.linalg.lstsq(design, target).solution  # (13, 5)
    torch.testing.assert_close(pruned[2].weight.double(), ref[:-1].t(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pruned[2].bias.double(), ref[-1], rtol=1e-4, atol=1e-5)
    assert _err(pruned, model, calib) < _err(_prune(model, calib, None).model, model, calib)


def test_refit_lstsq_of_the_moments_equals_the_normal_equations() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64) + 1.0
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    mean = x.mean(0)
    cov = (x - mean).t() @ (x - mean) / len(x)
    removed = np.array([1, 4])
    new_w, new_b = refit(w, b, mean, cov, removed, method="lstsq", damp=0.0)
    kept = [0, 2, 3, 5, 6]
    design = torch.cat([x[:, kept], torch.ones(200, 1, dtype=x.dtype)], 1)
    ref = torch.linalg.lstsq(design, x @ w.t() + b).solution
    torch.testing.assert_close(new_w[:, kept], ref[:-1].t())
    torch.testing.assert_close(new_b, ref[-1])
    assert float(new_w[:, removed].abs().sum()) == 0.0
    # ridge damping shrinks towards nothing: a huge damp leaves the kept columns near zero
    huge, _ = refit(w, b, mean, cov, removed, method="lstsq", damp=1e9)
    assert float(huge.abs().max()) < 1e-6
    # without a bias the fit has no intercept: plain least squares on the kept columns
    w0, b0 = refit(w, None, mean, cov + 0.0, removed, method="lstsq", damp=0.0)
    ref0 = torch.linalg.lstsq(x[:, kept], x @ w.t()).solution
    assert b0 is None
    torch.testing.assert_close(w0[:, kept], ref0.t())


@pytest.mark.parametrize("method", ["bias", "lstsq"])
def test_nothing_removed_leaves_the_model_unchanged(method: str) -> None:
    model = _mlp()
    calib = _data()
    pruned = _prune(model, calib, method, ratio=0.0).model
    for (name, p), q in zip(model.named_parameters(), pruned.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_repair_defaults_to_global_fluctuation_and_plain_calls_do_not() -> None:
    model = _mlp()
    calib = _data()
    assert _prune(model, calib, "bias").settings["scope"] == "global"
    assert _prune(model, calib, "bias").settings["importance"] == "fluctuation"
    plain = _prune(model, calib, None).settings
    assert (plain["scope"], plain["importance"]) == ("local", "l2")
    assert _prune(model, calib, "bias", scope="local").settings["scope"] == "local"


def test_inplace_gets_the_same_repair() -> None:
    model = _mlp()
    calib = _data()
    copy_result = _prune(model, calib, "lstsq").model
    target = copy.deepcopy(model)
    same = _prune(target, calib, "lstsq", inplace=True).model
    assert same is target
    for p, q in zip(copy_result.parameters(), same.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sequential_uses_the_repaired_upstream_and_helps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4)
    ).eval()
    calib = _data(dim=8, rows=128)
    test = _data(dim=8, rows=128, seed=9)
    errors = {}
    for name, rec in {
        "none": None,
        "bias": "bias",
        "one pass": ReconstructConfig("lstsq", sequential=False),
        "sequential": ReconstructConfig("lstsq"),
    }.items():
        errors[name] = _err(_prune(model, calib, rec, ratio=0.5).model, model, test)
    assert errors["sequential"] < errors["one pass"] < errors["none"]
    assert errors["bias"] < errors["none"]


def _bert_case():
    """Tiny BERT pruned 50 % (heads and neurons) with and without lstsq; both checked."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=32,
            attn_implementation="eager",
        )
    ).eval()
    g = torch.Generator().manual_seed(3)
    calib = []
    for _ in range(4):
        ids = torch.randint(0, 64, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 8:] = 0  # padding: left out of the statistics
        calib.append({"input_ids": ids, "attention_mask": mask})

    def err(m):
        with torch.no_grad():
            return sum(
                float(((m(**b).last_hidden_state - model(**b).last_hidden_state) ** 2).mean())
                for b in calib
            )

    kw = {"ratio": 0.5, "unit": ["head", "channel"], "round_to": 1, "progress": False}
    kw["scope"] = "local"
    kw["measure_latency"] = False
    plain = pg.prune_structured(model, calib[0], calib=calib, **kw)
    fixed = pg.prune_structured(model, calib[0], calib=calib, reconstruct="lstsq", **kw)
    attn = fixed.model.encoder.layer[0].attention
    assert attn.self.num_attention_heads == 2 and attn.output.dense.in_features == 16
    assert fixed.settings["reconstruct"] == "lstsq"
    assert fixed.settings["importance"] == "fluctuation"  # the default with a repair
    assert err(fixed.model) < 0.7 * err(plain.model)
    return model, calib, kw, fixed.model


def test_heads_and_neurons_of_a_hugging_face_bert() -> None:
    _bert_case()


def test_block_by_block_equals_whole_model_passes(monkeypatch) -> None:
    import prunekit.graph.reconstruct as rec

    model, calib, kw, blockwise = _bert_case()
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise rec._NotBlockwise

    monkeypatch.setattr(rec, "_by_blocks", refuse)
    whole = pg.prune_structured(model, calib[0], calib=calib, reconstruct="lstsq", **kw).model
    assert calls  # the block runner was tried first (and here refused, so whole passes ran)
    for (name, p), q in zip(blockwise.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_conv_channels_bias_is_exact_for_constant_channels(cnn, cnn_input) -> None:
    with torch.no_grad():  # conv1 channels 0, 1 output the constant 1.0 (after ReLU)
        cnn.conv1.weight[:2] = 0.0
        cnn.conv1.bias[:2] = 1.0
    calib = [cnn_input, torch.randn(4, 1, 8, 8)]
    kw = {"ratio": 0.25, "round_to": 1, "progress": False, "measure_latency": False}
    kw["importance"] = FirstUnitsFirst()
    kw["per_layer"] = {"conv1": 0.25, "conv2": 0.0, "fc1": 0.0}
    fixed = pg.prune_structured(cnn, cnn_input, calib=calib, reconstruct="bias", **kw).model
    plain = pg.prune_structured(cnn, cnn_input, calib=calib, **kw).model
    assert fixed.conv1.out_channels == 6
    with torch.no_grad():
        want, got, before = cnn(cnn_input), fixed(cnn_input), plain(cnn_input)
    # zero padding: the border patches see 0, not 1, so the mean compensation is close, not exact
    assert float((got - want).abs().max()) < 0.5 * float((before - want).abs().max())
    lstsq = pg.prune_structured(cnn, cnn_input, calib=calib, reconstruct="lstsq", **kw).model
    with torch.no_grad():
        assert float(((lstsq(cnn_input) - want) ** 2).mean()) < 0.25 * float(
            ((before - want) ** 2).mean()
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reconstruct": "refit"}, "unknown reconstruct method 'refit'"),
        ({"reconstruct": 3}, "reconstruct must be None"),
        ({"reconstruct": "lstsq", "calib": None}, "pass calib="),
        ({"reconstruct": "bias", "unit": "layer"}, "does not use reconstruct"),
    ],
)
def test_bad_reconstruct_input_is_refused(kwargs, message) -> None:
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"calib": _data(), **kwargs}
    with pytest.raises(ValueError, match=message):
        pg.prune_structured(model, torch.randn(1, 6), progress=False, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="damp must be"):
        ReconstructConfig("lstsq", damp=-1)


# --------------------------------------------------------------------------- allocation


def _two_block_mlp() -> nn.Sequential:
    """Two hidden layers; half of the second's neurons are nearly dead (cheap to remove)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).eval()
    with torch.no_grad():
        model[2].weight[16:] *= 0.01
        model[2].bias[16:] = 0.0
    return model


def test_structured_sensitivity_curves_and_widths() -> None:
    from prunekit.analysis import allocate_widths, structured_sensitivity

    model = _two_block_mlp()
    before = copy.deepcopy(model.state_dict())
    calib = _data(dim=8, rows=64, n=2)
    result = structured_sensitivity(model, calib[0][:1], calib, progress=False)
    for k, v in model.state_dict().items():  # measured in place, restored after
        assert torch.equal(v, before[k])
    assert set(result.curves) == {"0", "2"}
    for curve in result.curves.values():
        ratios = [r for r, _ in curve]
        assert ratios == sorted(ratios) and 0 < ratios[0] and ratios[-1] < 1
    half = {n: dict(c)[0.5] for n, c in result.curves.items()}
    assert half["2"] < 0.01 * half["0"]  # half of layer 2's neurons are nearly dead
    ratios = allocate_widths(result, 0.6)
    assert ratios["2"] > ratios["0"]  # the budget is spent where it hurts least
    macs = result.dense_macs - sum(
        ratios[n] * result.sizes[n] * result.unit_macs[n] for n in ratios
    )
    assert macs <= 0.6 * result.dense_macs + 1e-6
    assert "r=0.5" in result.table()


def test_allocation_sensitivity_beats_uniform_at_the_same_macs() -> None:
    model = _two_block_mlp()
    calib = _data(dim=8, rows=64, n=2)
    test = _data(dim=8, rows=64, seed=5)
    kw = {"target_macs": 0.6, "round_to": 1, "progress": False, "measure_latency": False}
    uniform = pg.prune_structured(model, calib[0][:1], calib=calib, **kw)
    chosen = pg.prune_structured(model, calib[0][:1], calib=calib, allocation="sensitivity", **kw)
    assert chosen.settings["allocation"] == "sensitivity"
    assert chosen.macs_after <= 0.6 * chosen.macs_before
    assert chosen.model[2].out_features < chosen.model[0].out_features
    assert _err(chosen.model, model, test) < _err(uniform.model, model, test)
    with pytest.raises(ValueError, match="target_macs= and calib="):
        pg.prune_structured(model, calib[0][:1], allocation="sensitivity", progress=False)


def test_match_dense_targets_the_dense_model() -> None:
    """match='dense': the first block's refit equals match='layer' (its inputs are still dense);
    later blocks differ (they also correct the drift of the earlier ones), and the bias-only
    repair then restores the dense model's mean output of the refit layer."""
    model, calib, kw, layer_match = _bert_case()
    config = ReconstructConfig("lstsq", match="dense")
    dense_match = pg.prune_structured(model, calib[0], calib=calib, reconstruct=config, **kw).model
    first = "encoder.layer.0.attention.output.dense.weight"
    later = "encoder.layer.1.output.dense.weight"
    got = dict(dense_match.named_parameters())
    want = dict(layer_match.named_parameters())
    torch.testing.assert_close(got[first], want[first], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[later], want[later], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="unknown match"):
        ReconstructConfig("lstsq", match="output")


def test_fluctuation_removes_constant_units_first_and_bias_makes_it_lossless() -> None:
    model = _mlp()
    with torch.no_grad():  # hidden units 0..3 are constant (0.5 after ReLU), and weigh the most
        model[0].weight[:4] = 0.0
        model[0].bias[:4] = 0.5
        model[2].weight[:, :4] *= 100.0
    calib = _data()
    fixed = _prune(model, calib, "bias", importance="fluctuation").model
    assert fixed[0].out_features == 12
    assert torch.all(fixed[0].bias != 0.5)  # the constant units went (l2 would keep them)
    for x in _data(seed=7):
        torch.testing.assert_close(fixed(x), model(x), rtol=1e-5, atol=1e-4)
