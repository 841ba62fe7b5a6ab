"""The sequential output proxy of oneshot(allocation="sensitivity"): block by block, earlier
blocks pruned in place, damage = divergence of the model's outputs on a calibration subsample."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from prunekit.analysis.sensitivity import (
    _LayerPruner,
    oneshot_grid,
    sequential_damage,
    split_count,
)
from prunekit.calibrate import calibration
from prunekit.patterns import parse_pattern
from prunekit.scores import get_criterion
from prunekit.targets import resolve_targets

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = (0.5, 0.7, 0.85)


def _robust(model, block: int) -> None:
    """Make a block easy to prune: 90 % of its weights tiny, so magnitude pruning up to 90 %
    removes almost nothing that matters."""
    g = torch.Generator().manual_seed(block)
    with torch.no_grad():
        for m in model.model.layers[block].modules():
            if isinstance(m, torch.nn.Linear):
                small = torch.rand(m.weight.shape, generator=g) < 0.9
                m.weight[small] *= 1e-3


def _measure(model, method="magnitude", operating=0.5, **kwargs):
    calib = calibration(
        torch.randint(0, 64, (3000,), generator=torch.Generator().manual_seed(0)),
        n_samples=4,
        seq_len=16,
    )
    targets = [t for t in resolve_targets(model, None, None) if "layers" in t.name]
    criterion = None if method == "sparsegpt" else get_criterion(method)
    pruner = _LayerPruner(method, criterion, parse_pattern("unstructured"), "local")
    return sequential_damage(
        model, targets, list(calib), pruner, GRID, operating=operating, progress=False, **kwargs
    )


@pytest.mark.parametrize("robust", [0, 1])
def test_the_fragile_block_is_ranked_most_sensitive_and_weights_are_restored(robust) -> None:
    model = tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    _robust(model, robust)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers, blocks = _measure(model)
    fragile = f"model.layers.{1 - robust}"
    easy = f"model.layers.{robust}"
    assert set(blocks) == {"model.layers.0", "model.layers.1"}
    # the fragile block hurts more at every sparsity, by far at the high ones
    assert all(f > e for f, e in zip(blocks[fragile], blocks[easy], strict=True))
    assert blocks[fragile][-1] > 10 * blocks[easy][-1]
    # damage grows with sparsity (KL of the logits, magnitude pruning of a whole block)
    assert all(b >= a for a, b in zip(blocks[fragile], blocks[fragile][1:], strict=False))
    # per layer: one curve per target, the fragile block's layers above the robust block's
    assert len(layers) == 14
    worst = max(layers, key=lambda n: layers[n][-1])
    assert worst.startswith(fragile + ".")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_earlier_blocks_are_pruned_in_place_while_a_block_is_measured() -> None:
    model = tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    _, dense_before = _measure(model, "wanda", per_layer=False, operating=0.0)
    _, pruned_before = _measure(model, "wanda", per_layer=False, operating=0.85)
    # block 0 sees the same inputs either way; block 1 sees block 0 pruned at 85 % or dense
    assert pruned_before["model.layers.0"] == pytest.approx(dense_before["model.layers.0"])
    assert pruned_before["model.layers.1"] != pytest.approx(dense_before["model.layers.1"])


def test_split_count_and_grid() -> None:
    assert sum(split_count(1001, [300, 300, 401])) == 1001
    assert split_count(7, [2, 100]) == [0, 7]
    assert split_count(5, [2, 3]) == [2, 3]
    assert oneshot_grid(0.5) == [0.4, 0.45, 0.5, 0.55, 0.6]
    assert max(oneshot_grid(0.95)) < 1.0


def test_starting_each_run_at_the_measured_block_changes_nothing(monkeypatch) -> None:
    """The runs skip the earlier blocks (their recorded outputs are replayed) and a block's
    reference is the previous block's run at the operating point: same damages as running the
    whole model every time."""
    import importlib

    sens = importlib.import_module("prunekit.analysis.sensitivity")

    model = tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None, num_hidden_layers=3)
    layers, blocks = _measure(model, "wanda")
    replayed = []

    class WholeModel(sens._Replay):
        def __enter__(self):
            replayed.append(self.replaying)
            self.replaying = False  # record only: every run goes through all blocks
            return super().__enter__()

    class FreshReference(sens._OutputDamage):
        def __init__(self, *args, reference=None, **kwargs):
            super().__init__(*args, **kwargs)  # the reference computed again, not reused

    monkeypatch.setattr(sens, "_Replay", WholeModel)
    monkeypatch.setattr(sens, "_OutputDamage", FreshReference)
    layers_full, blocks_full = _measure(model, "wanda")
    assert True in replayed  # blocks 1 and 2 were measured with replay in the first call
    for key in blocks:
        assert blocks[key] == pytest.approx(blocks_full[key], rel=1e-4, abs=1e-7)
    for key in layers:
        assert layers[key] == pytest.approx(layers_full[key], rel=1e-4, abs=1e-7)


def test_row_scope_grid_gives_the_masks_of_compute_masks() -> None:
    """Wanda's grid is cut from one sort of the scores: the same masks as one call per sparsity
    (existing zeros stay zeros)."""
    from prunekit.prune import compute_masks

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    with torch.no_grad():
        net[0].weight[:3, :5] = 0
    targets = resolve_targets(net, ["0", "2"], None)
    stats = {t.name: {"norm": torch.rand(t.weight().shape[1])} for t in targets}
    wanda = get_criterion("wanda")
    pruner = _LayerPruner("wanda", wanda, parse_pattern("unstructured"), "row")
    grid = [0.1, 0.5, 0.7, 0.93]
    for t in targets:
        for s, fast in zip(grid, pruner.matrices(t, stats, grid), strict=True):
            keep = compute_masks([t], wanda, stats, parse_pattern("unstructured"), s, {}, "row")
            assert torch.equal(fast, t.weight() * keep[t.name]), (t.name, s)
