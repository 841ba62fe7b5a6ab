"""The verbs on a CUDA GPU, checked against the same call on the CPU (skipped without CUDA).

Run where a GPU exists (the project's GPU check when a GPU machine is at hand):

    PYTHONPATH=src python -m pytest -q tests/test_cuda.py tests/test_oneshot.py -k cuda

Each test proves where the work ran (a hook records the device a layer computed on, or the
result's tensors are looked at) and compares with the CPU result: masks equal (or all but a few
ties near the threshold, where float sums in another order can flip a comparison), weights close.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prunekit
from conftest import SmallCNN, mlp, tiny_llama
from prunekit.calibrate import calibration
from prunekit.masks import get_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def calib():
    ids = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(0))
    return calibration(ids, n_samples=8, seq_len=32)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for name, module in model.named_modules():
        mask = get_mask(module)
        if mask is not None:
            found[name] = mask.cpu()
    return found


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


class DeviceSeen:
    """Forward pre-hooks that record the device every Linear of ``model`` computed on."""

    def __init__(self, model: nn.Module) -> None:
        self.devices: set[str] = set()
        self.handles = [
            m.register_forward_pre_hook(self._record)
            for m in model.modules()
            if isinstance(m, nn.Linear)
        ]

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.devices.add(module.weight.device.type)
        self.devices.add(args[0].device.type)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_oneshot_blocks_on_cuda_match_cpu(method: str, calib) -> None:
    # float32 on both: the default "auto" may calibrate in bfloat16 on one and not the other
    kwargs = {"method": method, "calibration_dtype": "float32", "progress": False}
    cpu = prunekit.oneshot(tiny_llama(), calib, **kwargs)
    model = tiny_llama()
    seen = DeviceSeen(model)
    gpu = prunekit.oneshot(model, calib, device="cuda", inplace=True, **kwargs)
    seen.remove()
    assert "cuda" in seen.devices  # the blocks really computed on the GPU ...
    assert all(p.device.type == "cpu" for p in gpu.model.parameters())  # ... and came back
    assert gpu.zeros == cpu.zeros  # the same exact count per layer
    assert agreement(masks(gpu.model), masks(cpu.model)) >= 0.995
    if method == "sparsegpt":  # the updated weights, not only the masks
        for (name, a), (_, b) in zip(
            gpu.model.state_dict().items(), cpu.model.state_dict().items(), strict=True
        ):
            if a.is_floating_point() and "mask" not in name:
                assert torch.allclose(a, b, atol=5e-3, rtol=1e-2), name


def test_oneshot_of_a_model_on_cuda_stays_there(calib) -> None:
    report = prunekit.oneshot(tiny_llama().cuda(), calib, method="sparsegpt", pattern="2:4",
                              progress=False)  # fmt: skip
    assert all(p.device.type == "cuda" for p in report.model.parameters())
    for name, mask in masks(report.model).items():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name  # exactly 2 kept in every group of 4
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    assert torch.isfinite(report.model(ids).logits).all()


def test_magnitude_prune_on_cuda_gives_the_cpu_mask() -> None:
    torch.manual_seed(0)
    net = mlp((64, 128, 96, 10))
    cpu = prunekit.prune(net, 0.7, progress=False, inplace=False)
    gpu = prunekit.prune(net.cuda(), 0.7, progress=False, inplace=False)
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    a, b = masks(gpu.model), masks(cpu.model)
    assert agreement(a, b) == 1.0


def test_finetune_on_cuda_keeps_zeros_and_learns() -> None:
    torch.manual_seed(0)
    net = mlp((16, 64, 64, 4)).cuda()
    pruned = prunekit.prune(net, 0.8, progress=False).model
    x = torch.randn(256, 16, device="cuda")
    y = (x[:, :4] > 0).long().argmax(1)
    data = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        before = float(loss_fn(pruned(x), y))
    zeros = {k: m == 0 for k, m in masks(pruned).items()}
    seen = DeviceSeen(pruned)
    tuned = prunekit.finetune(
        pruned, data, loss_fn, epochs=5, lr=1e-2, inplace=True, progress=False
    )
    seen.remove()
    model = getattr(tuned, "model", tuned)
    assert seen.devices == {"cuda"}
    with torch.no_grad():
        assert float(loss_fn(model(x), y)) < before
    for name, module in model.named_modules():
        if name in zeros:
            weight = module.weight.detach().cpu()
            assert bool((weight[zeros[name]] == 0).all()), name


def test_prune_structured_on_cuda_matches_cpu_widths() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    cpu = prunekit.prune_structured(cnn, x, target_macs=0.5, round_to=1, progress=False,
                                    measure_latency=False)  # fmt: skip
    gpu = prunekit.prune_structured(cnn.cuda(), x.cuda(), target_macs=0.5, round_to=1,
                                    progress=False)  # fmt: skip
    assert [g.kept for g in gpu.groups] == [g.kept for g in cpu.groups]
    assert all(p.device.type == "cuda" for p in gpu.model.parameters())
    assert gpu.latency is not None and gpu.latency.device.startswith("cuda")
    torch.testing.assert_close(gpu.model(x.cuda()).cpu(), cpu.model(x), atol=1e-4, rtol=1e-4)


def test_quantize_and_save_from_cuda_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    net = mlp((32, 64, 10))
    cpu = prunekit.quantize(prunekit.prune(net, 0.5, progress=False).model, bits=8).model
    gpu = prunekit.quantize(prunekit.prune(net.cuda(), 0.5, progress=False).model, bits=8).model
    for (name, a), (_, b) in zip(gpu.state_dict().items(), cpu.state_dict().items(), strict=True):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=0, msg=name)
    path = prunekit.save(gpu, tmp_path / "q", compressed=True)
    back = prunekit.load(path, lambda: mlp((32, 64, 10)))
    for (name, a), (_, b) in zip(back.state_dict().items(), gpu.state_dict().items(), strict=True):
        assert torch.equal(a.cpu(), b.cpu()), name  # bit for bit
