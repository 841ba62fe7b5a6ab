"""prunekit.prune: exact sparsity, pattern properties, scope, targets, determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit
from conftest import SmallCNN, mlp
from prunekit.masks import get_mask

SHAPES = st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=4)


def linear_stack(shapes: list[tuple[int, int]], seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict({f"l{i}": nn.Linear(i_, o) for i, (o, i_) in enumerate(shapes)})


def all_layers(shapes) -> list[str]:
    return [f"l{i}" for i in range(len(shapes))]


@settings(max_examples=40, deadline=None)
@given(shapes=SHAPES, sparsity=st.floats(0.0, 0.99))
def test_global_sparsity_is_exact_to_one_weight(shapes, sparsity) -> None:
    model = linear_stack(shapes)
    report = prunekit.prune(model, sparsity, targets=all_layers(shapes), scope="global")
    assert report.zeros == round(sparsity * report.params)


@settings(max_examples=40, deadline=None)
@given(shapes=SHAPES, sparsity=st.floats(0.0, 0.99))
def test_local_sparsity_is_exact_in_every_layer(shapes, sparsity) -> None:
    model = linear_stack(shapes)
    report = prunekit.prune(model, sparsity, targets=all_layers(shapes), scope="local")
    for row in report.layers:
        assert row.zeros == round(sparsity * row.params), row.name


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (5, 7)]),
)
def test_n_m_holds_in_every_group(rows, groups, nm) -> None:
    n, m = nm
    model = nn.ModuleDict({"a": nn.Linear(groups * m, rows)})
    report = prunekit.prune(model, pattern=f"{n}:{m}", targets="a")
    weight = report.model["a"].weight.detach()
    nonzeros_per_group = (weight.reshape(rows, groups, m) != 0).sum(-1)
    assert torch.all(nonzeros_per_group == n)


def test_n_m_on_conv_groups_along_flattened_input() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"c": nn.Conv2d(4, 6, 3)})  # 4*3*3 = 36 inputs per filter
    weight = prunekit.prune(model, pattern="2:4", targets="c").model["c"].weight.detach()
    assert torch.all((weight.reshape(6, 9, 4) != 0).sum(-1) == 2)


def test_n_m_keeps_the_largest_of_each_group() -> None:
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -3.0, 2.0, 0.5]]))
    model = nn.ModuleDict({"a": layer})
    out = prunekit.prune(model, pattern="2:4", targets="a").model["a"].weight.detach()
    assert out.tolist() == [[0.0, -3.0, 2.0, 0.0]]


def test_n_m_skips_layers_with_incompatible_input_and_warns() -> None:
    model = nn.ModuleDict({"ok": nn.Linear(8, 4), "odd": nn.Linear(6, 4)})
    with pytest.warns(UserWarning, match="odd.weight.*not a multiple of M=4"):
        report = prunekit.prune(model, pattern="2:4", targets=["ok", "odd"])
    assert "odd.weight" in report.skipped
    assert report.layer("odd").zeros == 0 and report.layer("ok").sparsity == 0.5


@settings(max_examples=30, deadline=None)
@given(
    tiles=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    block=st.sampled_from([(1, 1), (2, 2), (4, 1), (1, 4), (2, 3)]),
    sparsity=st.floats(0.0, 0.95),
    scope=st.sampled_from(["local", "global"]),
)
def test_block_pattern_zeroes_whole_tiles(tiles, block, sparsity, scope) -> None:
    r, c = block
    out, inp = tiles[0] * r, tiles[1] * c
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(inp, out), "b": nn.Linear(c * 2, r * 3)})
    report = prunekit.prune(
        model, sparsity, pattern=f"block:{r}x{c}", targets=["a", "b"], scope=scope
    )
    total_tiles = 0
    zero_tiles = 0
    for name in ("a", "b"):
        w = report.model[name].weight.detach()
        grid = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).permute(0, 2, 1, 3).flatten(2)
        zero = (grid == 0).all(-1)
        assert torch.all(zero | (grid != 0).all(-1)), "a tile is partly zero"
        total_tiles += zero.numel()
        zero_tiles += int(zero.sum())
        if scope == "local":
            assert int(zero.sum()) == round(sparsity * zero.numel())
    if scope == "global":
        assert zero_tiles == round(sparsity * total_tiles)


def test_block_tiles_are_scored_by_norm() -> None:
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0, 0.1, 5.0], [1.0, 1.0, 0.1, 0.1]]))
    out = prunekit.prune(nn.ModuleDict({"a": layer}), 0.5, pattern="block:2x2", targets="a")
    # left tile norm 2.0, right tile norm ~5.0: the left one goes.
    assert out.model["a"].weight.detach()[:, :2].abs().sum() == 0


def test_global_magnitude_agrees_with_torch_global_unstructured(cnn: SmallCNN) -> None:
    names = ["conv1", "conv2", "fc1", "head"]
    ours = prunekit.prune(cnn, 0.7, targets=names).model
    theirs = SmallCNN()
    theirs.load_state_dict(cnn.state_dict())
    torch_prune.global_unstructured(
        [(getattr(theirs, n), "weight") for n in names],
        pruning_method=torch_prune.L1Unstructured,
        amount=0.7,
    )
    for name in names:
        assert torch.equal(get_mask(getattr(ours, name)), getattr(theirs, name).weight_mask.bool())


def test_global_prunes_low_magnitude_layers_more() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"small": nn.Linear(32, 32), "big": nn.Linear(32, 32)})
    with torch.no_grad():
        model["big"].weight.mul_(10)
    report = prunekit.prune(model, 0.5, targets=["small", "big"])
    assert report.layer("small").sparsity > 0.9 and report.layer("big").sparsity < 0.1
    balanced = prunekit.prune(model, 0.5, targets=["small", "big"], normalize="mean")
    assert 0.3 < balanced.layer("small").sparsity < 0.7


def test_random_is_deterministic_with_seed(cnn: SmallCNN) -> None:
    def masks(seed: int) -> list[torch.Tensor]:
        model = prunekit.prune(cnn, 0.5, method="random", seed=seed).model
        return [get_mask(m) for m in model.modules() if get_mask(m) is not None]

    assert all(torch.equal(a, b) for a, b in zip(masks(3), masks(3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(masks(3), masks(4), strict=True))


def test_taylor_uses_data_and_leaves_grads_alone(cnn: SmallCNN, cnn_input) -> None:
    labels = torch.arange(4) % 10
    batches = [(cnn_input, labels)] * 3

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    report = prunekit.prune(
        cnn, 0.5, method="taylor", data=batches, loss_fn=loss_fn, progress=False
    )
    assert report.zeros == round(0.5 * report.params)
    assert all(p.grad is None for p in cnn.parameters())
    # A weight whose gradient is zero everywhere scores zero and is pruned first.
    magnitude = prunekit.prune(cnn, 0.5).model
    assert not torch.equal(get_mask(report.model.fc1), get_mask(magnitude.fc1))


def test_default_targets_skip_the_head_and_non_weights(cnn: SmallCNN) -> None:
    report = prunekit.prune(cnn, 0.5)
    assert [r.name for r in report.layers] == ["conv1.weight", "conv2.weight", "fc1.weight"]
    assert prunekit.stats(report.model).layer("head").zeros == 0
    included = prunekit.prune(cnn, 0.5, targets=["*"])
    assert "head.weight" in [r.name for r in included.layers]


def test_hf_output_embeddings_are_the_head() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    report = prunekit.prune(model, 0.5, pattern="2:4")
    names = [r.name for r in report.layers]
    assert "lm_head.weight" not in names and "transformer.h.0.attn.c_attn.weight" in names
    weight = report.model.transformer.h[0].mlp.c_fc.weight.detach()  # Conv1D stores (in, out)
    assert torch.all((weight.t().reshape(weight.shape[1], -1, 4) != 0).sum(-1) == 2)
    assert (
        report.model.transformer.wte.weight.count_nonzero() == model.transformer.wte.weight.numel()
    )


def test_targets_ignore_and_regex(cnn: SmallCNN) -> None:
    report = prunekit.prune(cnn, 0.5, targets="re:conv[12]", ignore="conv2")
    assert [r.name for r in report.layers] == ["conv1.weight"]


def test_per_layer_overrides_leave_the_global_pool() -> None:
    model = mlp()
    report = prunekit.prune(model, 0.5, targets=["0", "2", "4"], per_layer={"2": 0.9})
    assert report.layer("2").zeros == round(0.9 * report.layer("2").params)
    rest = [report.layer("0"), report.layer("4")]
    assert sum(r.zeros for r in rest) == round(0.5 * sum(r.params for r in rest))


def test_prune_does_not_touch_the_input_model_unless_inplace(cnn: SmallCNN) -> None:
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    report = prunekit.prune(cnn, 0.5)
    assert report.model is not cnn
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    same = prunekit.prune(cnn, 0.5, inplace=True)
    assert same.model is cnn and prunekit.stats(cnn).zeros > 0


def test_report_table_and_dict(cnn: SmallCNN) -> None:
    report = prunekit.prune(cnn, 0.5)
    text = str(report)
    assert "fc1.weight" in text and "50.00 %" in text and "method=magnitude" in text
    data = report.to_dict()
    assert data["settings"]["sparsity"] == 0.5 and data["zeros"] == report.zeros
    assert len(data["layers"]) == 3 and data["layers"][0]["name"] == "conv1.weight"


def test_block_tiles_with_signed_scores_prune_the_most_negative() -> None:
    from prunekit.scores import Criterion

    signed = Criterion("signed", lambda layer: torch.tensor([[-10.0, -10.0, 0.1, 0.1]] * 2))
    model = nn.ModuleDict({"a": nn.Linear(4, 2, bias=False)})
    out = prunekit.prune(model, 0.5, method=signed, pattern="block:2x2", targets="a")
    weight = out.model["a"].weight.detach()
    assert torch.all(weight[:, :2] == 0) and torch.all(weight[:, 2:] != 0)


def test_pattern_objects_are_validated() -> None:
    from prunekit.patterns import NM, Block

    with pytest.raises(ValueError, match="needs 1 <= N < M"):
        NM(0, 4)
    with pytest.raises(ValueError, match="needs R, C >= 1"):
        Block(0, 4)


def test_report_unpacks_as_model_and_report(cnn: SmallCNN) -> None:
    model, report = prunekit.prune(cnn, 0.5)
    assert model is report.model and report.sparsity == 0.5


class _WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(x))))


def test_embedding_tables_only_when_named() -> None:
    torch.manual_seed(0)
    model = _WithEmbedding()
    default = prunekit.prune(model, 0.5)
    assert [r.name for r in default.layers] == ["fc.weight"]  # never by default
    report = prunekit.prune(model, 0.6, targets=["emb", "fc"], scope="row")
    pruned = report.model
    zeros_per_token = (pruned.emb.weight == 0).sum(1)
    assert set(zeros_per_token.tolist()) <= {9, 10}  # 60 % of 16 in every token's row
    x = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        y = pruned(x)
        # the masked table feeds the forward pass; finalize bakes it in
        assert torch.equal(y, prunekit.finalize(copy.deepcopy(pruned))(x))
    assert "emb.weight" in str(prunekit.stats(pruned))
    with pytest.raises(ValueError, match="data-free"):
        prunekit.prune(model, 0.5, targets=["emb"], method="wanda", data=[x])


def test_the_report_title_names_the_verb_that_ran() -> None:
    net = mlp()
    calib = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    reports = {
        "prune": prunekit.prune(net, 0.5),
        "oneshot": prunekit.oneshot(net, calib, method="wanda", sparsity=0.5, progress=False),
        "prune_at_init": prunekit.prune_at_init(net, 0.5, "random"),
    }
    titles = {verb: str(report).splitlines()[0] for verb, report in reports.items()}
    assert all(title.startswith(f"prunekit {verb} (method=") for verb, title in titles.items()), (
        titles
    )
    assert all(report.to_dict()["verb"] == verb for verb, report in reports.items())
