"""The mask mechanism: zeros stay zero, and the model stays a normal model."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
from conftest import SmallCNN
from prunekit.masks import apply_mask, get_mask, is_masked, raw_parameter


@pytest.fixture
def masked(cnn: SmallCNN) -> SmallCNN:
    return prunekit.prune(cnn, 0.6, targets=["conv*", "fc1", "head"]).model


def test_no_forward_pre_hooks_and_plain_state_dict_keys(masked: SmallCNN) -> None:
    assert all(not m._forward_pre_hooks for m in masked.modules())
    keys = set(masked.state_dict())
    assert "fc1.weight" in keys and "fc1.weight_mask" in keys
    assert not any(k.endswith("_orig") or "parametrizations" in k for k in keys)
    assert isinstance(masked.fc1, nn.Linear) and is_masked(masked.fc1, "weight")


def test_deepcopy_and_pickle_keep_masks_and_outputs(masked: SmallCNN, cnn_input) -> None:
    expected = masked(cnn_input)
    for clone in (copy.deepcopy(masked), pickle.loads(pickle.dumps(masked))):
        assert torch.equal(clone(cnn_input), expected)
        assert torch.equal(get_mask(clone.fc1), get_mask(masked.fc1))
        assert is_masked(clone.conv2, "weight")


def test_torch_save_whole_model_loads_in_a_fresh_process(masked: SmallCNN, tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(masked, path)
    tests_dir = str(Path(__file__).parent)
    code = (
        f"import torch, sys; sys.path.insert(0, {tests_dir!r});"
        f"m = torch.load({str(path)!r}, weights_only=False);"
        "print(type(m.fc1).__name__, int(m.fc1.weight_mask.sum()), int((m.fc1.weight == 0).sum()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kept = int(get_mask(masked.fc1).sum())
    zeros = masked.fc1.weight.numel() - kept
    assert out.stdout.split() == ["MaskedLinear", str(kept), str(zeros)]


def test_state_dict_round_trip_into_masked_model(masked: SmallCNN, cnn_input) -> None:
    other = prunekit.prune(SmallCNN(), 0.1, targets=["conv*", "fc1", "head"]).model
    other.load_state_dict(masked.state_dict())
    assert torch.equal(other(cnn_input), masked(cnn_input))


def test_torch_compile_matches_eager(masked: SmallCNN, cnn_input) -> None:
    compiled = torch.compile(masked)
    torch.testing.assert_close(compiled(cnn_input), masked(cnn_input))


def test_finalize_state_dict_loads_into_plain_architecture(masked: SmallCNN, cnn_input) -> None:
    dense = prunekit.finalize(masked)
    assert is_masked(masked.fc1)  # not in place by default
    assert type(dense.fc1) is nn.Linear and not any(is_masked(m) for m in dense.modules())
    plain = SmallCNN()
    plain.load_state_dict(dense.state_dict())  # strict
    assert torch.equal(plain(cnn_input), masked(cnn_input))
    assert prunekit.stats(plain).zeros == prunekit.stats(masked).zeros


def test_finalize_inplace_returns_same_object(masked: SmallCNN) -> None:
    assert prunekit.finalize(masked, inplace=True) is masked
    assert type(masked.fc1) is nn.Linear


def test_masked_gradients_are_exactly_zero(masked: SmallCNN, cnn_input) -> None:
    masked(cnn_input).sum().backward()
    grad = raw_parameter(masked.fc1).grad
    assert grad is not None and torch.all(grad[~get_mask(masked.fc1)] == 0)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=1e-2),
    ],
    ids=["sgd-momentum", "adamw-decay", "adam"],
)
def test_masks_never_revive_under_optimisers(masked: SmallCNN, cnn_input, make_opt) -> None:
    masks = {n: get_mask(m).clone() for n, m in masked.named_modules() if is_masked(m)}
    opt = make_opt(masked.parameters())
    target = torch.randint(0, 10, (cnn_input.shape[0],), generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        opt.zero_grad()
        nn.functional.cross_entropy(masked(cnn_input), target).backward()
        opt.step()
    for name, module in masked.named_modules():
        if name in masks:
            raw = raw_parameter(module)
            assert torch.all(raw[~masks[name]] == 0), name
            assert torch.any(raw[masks[name]] != 0)


def test_pruning_again_extends_the_mask(cnn: SmallCNN) -> None:
    first = prunekit.prune(cnn, 0.5, scope="local").model
    zeros_before = {n: (m.weight == 0).clone() for n, m in first.named_modules() if is_masked(m)}
    # Perturb the surviving weights so a fresh ranking would differ from the first.
    with torch.no_grad():
        for m in first.modules():
            if is_masked(m):
                raw_parameter(m).mul_(torch.rand_like(m.weight) * 4)
    second = prunekit.prune(first, 0.8, scope="local").model
    for name, module in second.named_modules():
        if name in zeros_before:
            assert torch.all(module.weight[zeros_before[name]] == 0)
            assert prunekit.stats(second).layer(name).zeros == round(0.8 * module.weight.numel())


def test_apply_mask_rejects_wrong_shape() -> None:
    layer = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="does not match"):
        apply_mask(layer, "weight", torch.ones(3, 3, dtype=torch.bool))


def test_dtype_moves_carry_the_mask_along(masked: SmallCNN, cnn_input) -> None:
    wide = copy.deepcopy(masked).to(torch.float64)
    assert wide.fc1.weight_mask.dtype == torch.float64 == wide.fc1.weight.dtype
    assert torch.equal(get_mask(wide.fc1), get_mask(masked.fc1))
    torch.testing.assert_close(wide(cnn_input.double()).float(), masked(cnn_input))


def test_get_mask_is_a_bool_copy(masked: SmallCNN) -> None:
    mask = get_mask(masked.fc1)
    assert mask.dtype == torch.bool
    mask.fill_(True)
    assert not get_mask(masked.fc1).all()


def test_pickled_bytes_do_not_need_prunekit_classes_by_name(masked: SmallCNN) -> None:
    buffer = io.BytesIO()
    pickle.dump(masked, buffer)
    assert b"MaskedLinear" not in buffer.getvalue()
