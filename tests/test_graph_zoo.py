"""Small architectures for structured pruning, the lossless-surgery check, and its tests.

For each model: trace it, zero a chosen set of units of every group whose removal is exact (the
units then contribute nothing), cut exactly those units out, and compare the outputs with the
zeroed model's, to float tolerance. Then prune with the public verb and check that the model
runs, shapes are consistent, and params / MACs fall as reported.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit.graph as pg
from prunekit.graph.groups import build_groups
from prunekit.graph.surgery import apply_removal
from prunekit.graph.trace import call_model, iter_tensors, trace

# tiny models run far faster on one thread (conftest.one_thread), and leave the other core be
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- architectures


class BasicBlock(nn.Module):
    """ResNet block; shortcut: identity, 1x1 projection, or parameter-free ("option A")."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "identity") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut_kind = shortcut
        self.pad = (cout - cin) // 2
        if shortcut == "projection":
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut_kind == "projection":
            short = self.shortcut(x)
        elif self.shortcut_kind == "optionA":
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            short = x
        return F.relu(out + short)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, "projection"), BasicBlock(16, 16))
        self.layer3 = nn.Sequential(BasicBlock(16, 24, 2, "optionA"), BasicBlock(24, 24))
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True)
        )
        self.blocks = nn.Sequential(
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 16, 1, 4),
        )
        self.head = nn.Sequential(
            nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean([2, 3]))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.conv2 = (
            nn.BatchNorm2d(2 * growth),
            nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, new], 1)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4), DenseLayer(16, 4))
        self.trans = nn.Sequential(
            nn.BatchNorm2d(20), nn.ReLU(), nn.Conv2d(20, 10, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = nn.Sequential(DenseLayer(10, 4), DenseLayer(14, 4))
        self.norm = nn.BatchNorm2d(18)
        self.fc = nn.Linear(18, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.trans(self.block1(self.conv0(x))))
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def conv_block(cin: int, cout: int, norm: str = "bn") -> nn.Sequential:
    norm_layer = nn.BatchNorm2d(cout) if norm == "bn" else nn.GroupNorm(2, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        norm_layer,
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip concatenations and ConvTranspose upsampling; outputs 2 maps."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2 = conv_block(3, 8), conv_block(8, 16, "gn")
        self.mid = conv_block(16, 32)
        self.up2, self.dec2 = nn.ConvTranspose2d(32, 16, 2, stride=2), conv_block(32, 16)
        self.up1, self.dec1 = nn.ConvTranspose2d(16, 8, 2, stride=2), conv_block(16, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([e1, self.up1(d2)], dim=1))
        return self.out(d1)


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(12, 32),
        nn.ReLU(),
        nn.Linear(32, 24),
        nn.GELU(),
        nn.Linear(24, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = (
            nn.LayerNorm(dim),
            nn.MultiheadAttention(dim, heads, batch_first=True),
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 4, depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class RNNNet(nn.Module):
    """Embedding -> bidirectional 2-layer LSTM -> GRU -> head; returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 12)
        self.lstm = nn.LSTM(12, 10, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(20, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        out, (h, _) = self.lstm(self.embed(idx))
        out2, h2 = self.gru(out)
        return {"logits": self.head(out2[:, -1]), "state": h2[-1].sum(-1, keepdim=True)}


class GroupedConvNet(nn.Module):
    """Grouped (non-depthwise) conv, tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gconv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.conv2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv2(F.relu(self.gconv(F.relu(self.conv1(x)))))
        return self.fc(y.mean((2, 3))), y.amax((1, 2, 3))


def hf_models() -> dict[str, tuple[nn.Module, dict]]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=32,
            attn_implementation="eager",
        )
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=64,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=4,
            attn_implementation="eager",
        )
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )
    mask = torch.ones_like(ids)
    return {
        "bert": (bert.eval(), {"input_ids": ids, "attention_mask": mask}),
        "gpt2": (gpt2.eval(), {"input_ids": ids, "use_cache": False}),
        "llama": (llama.eval(), {"input_ids": ids, "use_cache": False}),
    }


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so the checks are not vacuous."""
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def zoo() -> dict[str, tuple[nn.Module, object]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 16, 16, generator=g)
    return {
        "resnet": (_randomize_bn(ResNet()), img),
        "mobilenetv2": (_randomize_bn(MobileNetV2()), img),
        "densenet": (_randomize_bn(DenseNet()), img),
        "unet": (_randomize_bn(UNet()), img),
        "mlp": (mlp().eval(), torch.randn(4, 12, generator=g)),
        "vit": (ViT().eval(), img),
        "rnn": (RNNNet().eval(), torch.randint(0, 20, (2, 5), generator=g)),
        "grouped": (GroupedConvNet().eval(), img),
    }


# --------------------------------------------------------------------------- the checks


def outputs(model: nn.Module, inputs) -> list[torch.Tensor]:
    from prunekit.graph.trace import _plain

    with torch.no_grad():
        return list(iter_tensors(_plain(call_model(model, inputs))))


def assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def zero_units(model: nn.Module, group, units: np.ndarray) -> None:
    """Zero every parameter slice of the chosen units: they then contribute nothing."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for (key, dim), per_unit in group.slices.items():
            if key not in params:
                continue
            idx = torch.as_tensor(np.concatenate([per_unit[u] for u in units]))
            params[key].index_fill_(dim, idx, 0.0)


def lossless_check(
    model: nn.Module, inputs, kinds=("channel", "head"), fraction: float = 0.5, gqa: str = "kv"
) -> dict:
    """Zero ``fraction`` of the units of every exact group, remove exactly those, compare."""
    model = copy.deepcopy(model).eval()
    graph = trace(model, inputs, gqa=gqa)
    groups = [
        g for g in build_groups(graph) if g.kind in kinds and g.exact and not (gqa == "q" and g.kv)
    ]
    assert groups, "no exact group to test"
    rng = np.random.default_rng(0)
    roots = []
    for g in groups:
        k = max(1, int(fraction * g.n_units))
        k = min(k, g.n_units - 1)
        if k <= 0:
            continue
        if g.parents is not None:  # GQA q mode: the same number from every kv group
            units = []
            for p in np.unique(g.parents):
                idx = np.nonzero(g.parents == p)[0]
                units.extend(rng.choice(idx, size=len(idx) // 2, replace=False))
            units = np.array(sorted(units))
        else:
            units = np.sort(rng.choice(g.n_units, size=k, replace=False))
        zero_units(model, g, units)
        roots.append(g.roots[units])
    want = outputs(model, inputs)
    pruned = copy.deepcopy(model)
    apply_removal(pruned, graph, np.concatenate(roots))
    got = outputs(pruned, inputs)
    assert_close(got, want)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in pruned.parameters())
    assert after < before
    return {"groups": len(groups), "params": (before, after), "model": pruned}


ZOO = ["resnet", "mobilenetv2", "densenet", "unet", "mlp", "vit", "rnn", "grouped"]


@pytest.mark.parametrize("name", ZOO)
def test_lossless_surgery(name: str) -> None:
    model, inputs = zoo()[name]
    lossless_check(model, inputs)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("scope", ["local", "global"])
def test_prune_structured_runs_and_reports(name: str, scope: str) -> None:
    model, inputs = zoo()[name]
    dense = outputs(model, inputs)
    report = pg.prune_structured(
        model, inputs, ratio=0.4, unit=["channel", "head"], scope=scope, round_to=1, progress=False
    )
    pruned = report.model
    got = outputs(pruned, inputs)
    assert [t.shape for t in got] == [t.shape for t in dense]
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    recount = pg.count(pruned, inputs)
    assert (recount.params, recount.macs) == (report.params_after, report.macs_after)
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(dense, outputs(model, inputs), strict=True)
    )  # untouched
    assert any(g.removed for g in report.groups)
    assert all(g.kept >= 1 for g in report.groups)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("gqa", ["kv", "q"])
def test_lossless_surgery_hugging_face(name: str, gqa: str) -> None:
    model, inputs = hf_models()[name]
    lossless_check(model, inputs, gqa=gqa)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("unit", ["channel", "head"])
def test_prune_structured_hugging_face(name: str, unit: str) -> None:
    model, inputs = hf_models()[name]
    dense = outputs(model, inputs)
    report = pg.prune_structured(model, inputs, ratio=0.5, unit=unit, progress=False)
    got = outputs(report.model, inputs)
    assert [t.shape for t in got] == [t.shape for t in dense]
    recount = pg.count(report.model, inputs)
    assert (recount.params, recount.macs) == (report.params_after, report.macs_after)
    assert report.macs_after < report.macs_before
    if unit == "head":
        assert all(g.kind == "head" and g.kept == g.units // 2 for g in report.groups)


def test_hugging_face_head_attributes_follow() -> None:
    models = hf_models()
    bert, inputs = models["bert"]
    attn = (
        pg.prune_structured(bert, inputs, ratio=0.5, unit="head", progress=False)
        .model.encoder.layer[0]
        .attention.self
    )
    assert (attn.num_attention_heads, attn.all_head_size, attn.query.out_features) == (2, 16, 16)
    gpt2, inputs = models["gpt2"]
    attn = (
        pg.prune_structured(gpt2, inputs, ratio=0.5, unit="head", progress=False)
        .model.transformer.h[0]
        .attn
    )
    assert (attn.num_heads, attn.split_size, attn.c_attn.weight.shape[1]) == (2, 16, 48)
    llama, inputs = models["llama"]
    pruned = pg.prune_structured(llama, inputs, ratio=0.5, unit="head", progress=False).model
    attn = pruned.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (
        16,
        8,
        2,
    )
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)
    pruned = pg.prune_structured(
        llama, inputs, ratio=0.5, unit="head", gqa="q", progress=False
    ).model
    attn = pruned.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) == (
        16,
        16,
        1,
    )
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_gqa_with_padding_mask(impl: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        attn_implementation=impl,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    for gqa in ("kv", "q"):
        lossless_check(model, inputs, kinds=("head",), gqa=gqa)
