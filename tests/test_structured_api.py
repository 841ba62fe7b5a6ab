"""prune_structured: options, criteria, targets, bad input, unsupported ops, depth pruning."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit.graph as pg
from prunekit.graph.importance import GroupImportance
from prunekit.graph.modules import PrunableMultiheadAttention
from test_graph_zoo import (
    MobileNetV2,
    ResNet,
    ViT,
    _randomize_bn,
    assert_close,
    hf_models,
    mlp,
    outputs,
)

# tiny models run far faster on one thread (conftest.one_thread), and leave the other core be
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp().eval()


X = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
IMG = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- options


def test_local_ratio_per_group_and_model_untouched(net) -> None:
    before = state(net)
    pruned, report = pg.prune_structured(net, X, ratio=0.5, round_to=1, progress=False)
    assert [m.out_features for m in pruned if isinstance(m, nn.Linear)] == [16, 12, 8, 3]
    assert unchanged(net, before)
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    json.dumps(report.to_dict())
    assert (
        "removed" in str(report)
        and report.layers()[0]["params_before"] > report.layers()[0]["params_after"]
    )


def test_output_and_input_dims_are_never_touched(net) -> None:
    pruned = pg.prune_structured(net, X, ratio=0.9, scope="global", progress=False).model
    assert pruned[0].in_features == 12 and pruned[-1].out_features == 3


def test_pin_outputs_false_allows_pruning_the_output_dim() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16))
    pruned = pg.prune_structured(body, X, ratio=0.5, pin_outputs=False, progress=False).model
    assert pruned[2].out_features == 8


def test_global_scope_removes_the_pooled_fraction(net) -> None:
    report = pg.prune_structured(net, X, ratio=0.5, scope="global", round_to=1, progress=False)
    total = sum(g.units for g in report.groups)
    assert sum(g.removed for g in report.groups) == round(0.5 * total)
    assert len({g.removed / g.units for g in report.groups}) > 1  # not uniform


def test_min_keep_and_never_the_last_unit(net) -> None:
    report = pg.prune_structured(net, X, ratio=0.99, min_keep=3, round_to=1, progress=False)
    assert all(g.kept == 3 for g in report.groups)
    report = pg.prune_structured(net, X, ratio=0.99, scope="global", round_to=1, progress=False)
    assert all(g.kept >= 1 for g in report.groups)


def test_round_to_keeps_multiples(net) -> None:
    report = pg.prune_structured(net, X, ratio=0.3, round_to=8, progress=False)
    assert [g.kept for g in report.groups] == [24, 24, 16]
    report = pg.prune_structured(net, X, ratio=0.6, round_to=8, scope="global", progress=False)
    assert all(g.kept % 8 == 0 for g in report.groups)


def test_ignore_leaves_groups_whole(net) -> None:
    report = pg.prune_structured(net, X, ratio=0.5, ignore=["2", "re:4"], progress=False)
    assert [g.name for g in report.groups] == ["0"]
    assert report.model[2].out_features == 24 and report.model[4].out_features == 16


def test_per_layer_overrides(net) -> None:
    report = pg.prune_structured(
        net, X, ratio=0.5, per_layer={"2": 0.25, "*": 0.0}, round_to=1, progress=False
    )
    assert [g.kept for g in report.groups] == [32, 18, 16]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_target_macs_and_params(scope: str) -> None:
    model = _randomize_bn(ResNet())
    dense = pg.count(model, IMG)
    report = pg.prune_structured(
        model, IMG, target_macs=0.5, scope=scope, round_to=1, progress=False
    )
    assert report.macs_after <= 0.5 * dense.macs
    assert report.macs_after > 0.4 * dense.macs  # not much more than needed
    report = pg.prune_structured(
        model, IMG, target_params=10_000, scope=scope, round_to=1, progress=False
    )
    assert report.params_after <= 10_000


def test_unreachable_target_says_so(net) -> None:
    before = state(net)
    with pytest.raises(ValueError, match="cannot be reached"):
        pg.prune_structured(net, X, target_macs=10, progress=False)
    assert unchanged(net, before)


def test_inplace_and_tuple_unpacking(net) -> None:
    pruned, report = pg.prune_structured(net, X, ratio=0.5, inplace=True, progress=False)
    assert pruned is net and net[0].out_features == 16 and report.model is net


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ratio": 1.0}, "ratio must be a number in"),
        ({"ratio": -0.1}, "ratio must be a number in"),
        ({"unit": "filters"}, "unknown unit 'filters'"),
        ({"unit": ["layer", "head"]}, "cannot be combined"),
        ({"scope": "row"}, "unknown scope 'row'"),
        ({"importance": "hessian"}, "unknown importance 'hessian'"),
        ({"gqa": "both"}, "unknown gqa 'both'"),
        ({"reduce": "prod"}, "unknown reduce 'prod'"),
        ({"normalize": "z"}, "unknown normalize 'z'"),
        ({"round_to": 0}, "round_to must be a positive integer"),
        ({"min_keep": 0}, "min_keep must be an integer >= 1"),
        ({"ignore": "fc9"}, "ignore pattern 'fc9' matches no module"),
        ({"per_layer": {"2": 1.5}}, r"per_layer\['2'\] must be a number"),
        ({"per_layer": {"nope": 0.5}}, "per_layer pattern 'nope' matches no module"),
        ({"target_macs": -1}, "target_macs must be a positive number"),
        ({"target_macs": 1.5}, r"target_macs=1.5 is above 1, .* a count is a whole number"),
        ({"target_params": 2.25}, "give a fraction of the dense model in"),
        ({"importance": "taylor"}, "needs a loss"),
        ({"unit": "layer", "importance": "l2"}, "unknown layer importance 'l2'"),
    ],
)
def test_bad_input_is_refused_before_any_change(net, kwargs, message) -> None:
    before = state(net)
    with pytest.raises(ValueError, match=message):
        pg.prune_structured(net, X, progress=False, **kwargs)
    assert unchanged(net, before)


# --------------------------------------------------------------------------- what the tracer refuses


class EinsumNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.mix = Mixer()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.mix(self.fc(x)))


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.einsum("bc,cd->bd", x, self.w)


class FFTNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.fft.rfft(self.conv(x), dim=1).abs().transpose(1, 2)).sum(1)


class LiteralView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 2)

    def forward(self, x):
        y = F.adaptive_avg_pool2d(self.conv(x), 2)
        return self.fc(y.reshape(x.shape[0], 16 * 4))


@pytest.mark.parametrize(
    "model, inputs, op, module",
    [
        (EinsumNet(), X, "einsum", "mix"),
        (FFTNet(), torch.randn(2, 2, 8), "fft_rfft", ""),
    ],
)
def test_unsupported_operation_is_named_and_nothing_changes(model, inputs, op, module) -> None:
    before = state(model)
    with pytest.raises(pg.UnsupportedOperationError, match=op) as info:
        pg.prune_structured(model, inputs, ratio=0.5, progress=False)
    assert info.value.op == op and info.value.module == module
    assert (f"module {module!r}" if module else "top-level forward") in str(info.value)
    assert unchanged(model, before)


def test_hard_coded_sizes_fail_verification_by_name() -> None:
    model = LiteralView()
    before = state(model)
    with pytest.raises(pg.StructuredPruningError, match=r"reshape\(2, 64\) in module ''") as info:
        pg.prune_structured(model, IMG, ratio=0.5, round_to=1, progress=False)
    assert "was not changed" in str(info.value)
    assert unchanged(model, before)
    # leaving the conv alone works
    assert (
        pg.prune_structured(
            model, IMG, ratio=0.5, ignore="conv", round_to=1, progress=False
        ).model.conv.out_channels
        == 16
    )


# --------------------------------------------------------------------------- importance


def _data(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)
    ]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("importance", ["l1", "l2", "random", "taylor", "activation", "apoz"])
def test_importance_criteria_run_and_differ(net, importance) -> None:
    report = pg.prune_structured(
        net,
        X,
        ratio=0.5,
        importance=importance,
        calib=_data(),
        loss_fn=_loss,
        round_to=1,
        progress=False,
    )
    assert [g.kept for g in report.groups] == [16, 12, 8]
    assert report.settings["importance"] == importance


def test_l2_removes_the_smallest_units(net) -> None:
    with torch.no_grad():
        net[0].weight[:5].mul_(1e-3)
        net[0].bias[:5].mul_(1e-3)
        net[2].weight[:, :5].mul_(1e-3)
    kept = (
        pg.prune_structured(net, X, ratio=5 / 32, ignore=["2", "4"], round_to=1, progress=False)
        .model[0]
        .weight
    )
    assert torch.equal(kept, net[0].weight[5:])


def test_bn_scale_scores_batchnorm_groups_only() -> None:
    model = _randomize_bn(MobileNetV2())
    with torch.no_grad():
        model.blocks[1].conv[1].weight[:8] = 0.0  # block 1's expand and depthwise BNs (one group)
        model.blocks[1].conv[4].weight[:8] = 0.0
    report = pg.prune_structured(
        model, IMG, ratio=0.25, importance="bn_scale", round_to=1, progress=False
    )
    pruned_bn = report.model.blocks[1].conv[1].weight
    assert pruned_bn.shape[0] == 24 and bool((pruned_bn != 0).all())


def test_a_custom_criterion_is_a_small_class(net) -> None:
    class LastFirst(GroupImportance):
        name = "index"

        def score(self, group, ctx):
            return np.arange(group.n_units, dtype=float)[::-1]  # the last units score lowest

    pruned = pg.prune_structured(
        net, X, ratio=0.25, importance=LastFirst(), round_to=1, progress=False
    ).model
    assert torch.equal(pruned[0].weight, net[0].weight[:24])


def test_vit_heads_become_prunable_attention() -> None:
    torch.manual_seed(0)
    model = ViT().eval()
    pruned = pg.prune_structured(model, IMG, ratio=0.5, unit="head", progress=False).model
    attn = pruned.blocks[0].attn
    assert isinstance(attn, PrunableMultiheadAttention) and attn.num_heads == 2
    assert attn.in_proj_weight.shape == (24, 16) and attn.out_proj.in_features == 8


@pytest.mark.parametrize("batch_first", [True, False])
def test_prunable_attention_matches_torch(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=True, add_bias_kv=True, batch_first=batch_first).eval()
    swapped = copy.deepcopy(mha)
    swapped.__class__ = PrunableMultiheadAttention
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, -1] = True
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    for kwargs in (
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": mask},
        {"need_weights": False},
        {"average_attn_weights": False},
    ):
        want, want_w = mha(q, q, q, **kwargs)
        got, got_w = swapped(q, q, q, **kwargs)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        if want_w is not None:
            torch.testing.assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- depth


def test_depth_removes_the_block_that_does_nothing_losslessly() -> None:
    model = _randomize_bn(ResNet())
    with torch.no_grad():
        model.layer2[1].bn2.weight.zero_()
        model.layer2[1].bn2.bias.zero_()  # residual branch outputs 0: the block is relu(x) = x
    report = pg.prune_structured(model, IMG, ratio=1 / 6, unit="layer", progress=False)
    assert report.removed_layers == ["layer2.1"]
    assert len(report.model.layer2) == 1
    assert_close(outputs(report.model, IMG), outputs(model, IMG))
    assert report.params_after < report.params_before and report.macs_after < report.macs_before


@pytest.mark.parametrize("importance", ["influence", "loss", "random"])
def test_depth_pruning_hugging_face(importance: str) -> None:
    model, inputs = hf_models()["llama"]
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    calib = [{**inputs, "labels": inputs["input_ids"]}]
    report = pg.prune_structured(
        model, inputs, ratio=0.5, unit="layer", importance=importance, calib=calib, progress=False
    )
    pruned = report.model
    assert len(pruned.model.layers) == 1 and pruned.config.num_hidden_layers == 1
    assert pruned.model.layers[0].self_attn.layer_idx == 0
    if importance == "influence":  # the loss change of skipping a random layer can be negative
        assert report.removed_layers == ["model.layers.0"]
        assert_close(outputs(pruned, inputs), outputs(model, inputs))
    generated = pruned.generate(inputs["input_ids"][:1, :3], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_depth_target_and_patterns() -> None:
    model = _randomize_bn(ResNet())
    report = pg.prune_structured(model, IMG, unit="layer", target_params=0.8, progress=False)
    assert report.params_after <= 0.8 * report.params_before
    report = pg.prune_structured(
        model, IMG, unit="layer", ratio=0.6, layers=["layer3.*"], progress=False
    )
    assert report.removed_layers == ["layer3.1"]  # layer3.0 changes shape: not removable
    with pytest.raises(ValueError, match="match no removable block"):
        pg.prune_structured(model, IMG, unit="layer", layers=["nothing.*"], progress=False)


def test_structured_taylor_leaves_the_callers_gradients_alone(net) -> None:
    _loss(net, _data(1)[0]).backward()
    before = {k: p.grad.clone() for k, p in net.named_parameters()}
    pg.prune_structured(
        net, X, ratio=0.5, importance="taylor", calib=_data(), loss_fn=_loss, progress=False
    )
    assert all(torch.equal(p.grad, before[k]) for k, p in net.named_parameters())


def test_layer_unit_refuses_options_it_does_not_use() -> None:
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(ValueError, match="unit='layer' .* does not use round_to, scope"):
        pg.prune_structured(model, ids, unit="layer", round_to=8, scope="global", progress=False)
