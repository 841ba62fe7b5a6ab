"""oneshot robustness: SparseGPT identical for any thread count, one behaviour for layers a
pattern cannot take (prune and oneshot alike), per-block checkpoints that resume to exactly the
uninterrupted result (after a KeyboardInterrupt in place or a SIGKILL), and the marker of an
interrupted in-place run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import prunekit
import prunekit.calibrate.oneshot as oneshot_module
from conftest import tiny_llama
from prunekit.calibrate import calibration
from prunekit.calibrate.oneshot import oneshot
from prunekit.calibrate.progress import MARKER
from prunekit.calibrate.sparsegpt import sparsegpt_prune
from prunekit.masks import get_mask

pytest.importorskip("transformers")
TESTS = Path(__file__).parent


def small_llama() -> nn.Module:
    """Three blocks of seven targets each."""
    return tiny_llama(bos_token_id=None, eos_token_id=None, pad_token_id=None, num_hidden_layers=3)


def make_calib():
    ids = torch.randint(0, 64, (2000,), generator=torch.Generator().manual_seed(0))
    return calibration(ids, n_samples=4, seq_len=32)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"tensors differ: {differ}"


@pytest.fixture(scope="module")
def calib():
    return make_calib()


@pytest.fixture(scope="module")
def reference(calib):
    """Uninterrupted runs (state and report details), computed once per setting."""
    cache: dict = {}

    def get(method: str, **kwargs):
        key = (method, tuple(sorted(kwargs.items())))
        if key not in cache:
            report = oneshot(small_llama(), calib, method=method, progress=False, **kwargs)
            cache[key] = (state(report.model), report.details)
        return cache[key]

    return get


def interrupt_at(monkeypatch, call: int) -> None:
    """KeyboardInterrupt at the ``call``-th mask oneshot applies (mid-block)."""
    real, calls = oneshot_module.apply_mask, []

    def apply_mask(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(oneshot_module, "apply_mask", apply_mask)


# -- SparseGPT does not depend on the thread count ---------------------------------------------


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_layer_identical_on_one_and_two_threads(nm, threads) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) * (0.1 + 3 * torch.rand(256, generator=g))
    hessian = 2 * x.T @ x / len(x)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(sparsegpt_prune(weight, hessian, 0.6, nm, block_size=64))
        assert torch.get_num_threads() == n  # the solver restores the caller's thread count
    one, two = results
    assert torch.equal(one.keep, two.keep)
    assert torch.equal(one.weight, two.weight)  # bit for bit, not only the masks
    assert int((~one.keep).sum()) == (128 * 128 if nm else round(0.6 * 128 * 256))


def test_oneshot_sparsegpt_identical_on_one_and_two_threads(threads) -> None:
    ids = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(1))
    calib = calibration(ids, n_samples=2, seq_len=32)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(
            state(oneshot(small_llama(), calib, method="sparsegpt", progress=False).model)
        )
    assert_same(*results)


# -- a layer the pattern cannot take: the same in prune and oneshot --------------------------


def _run(verb: str, model: nn.Module, **kwargs):
    if verb == "prune":
        return prunekit.prune(model, pattern="2:4", scope="local", **kwargs)
    return oneshot(
        model, [torch.randn(16, 6)], method="magnitude", pattern="2:4", progress=False, **kwargs
    )


@pytest.mark.parametrize("verb", ["prune", "oneshot"])
def test_unpatternable_layer_is_skipped_with_a_warning_in_both_verbs(verb) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    first = model[0].weight.detach().clone()
    with pytest.warns(UserWarning, match=r"skipping 0\.weight for pattern 2:4: input size 6 is"):
        report = _run(verb, model, inplace=True)
    assert report.skipped == {"0.weight": "input size 6 is not a multiple of M=4"}
    assert get_mask(model[0]) is None and torch.equal(model[0].weight, first)
    kept = get_mask(model[2]).reshape(8, 2, 4).sum(-1)
    assert torch.equal(kept, torch.full((8, 2), 2))


@pytest.mark.parametrize("verb", ["prune", "oneshot"])
def test_no_layer_fits_the_pattern_raises_in_both_verbs_before_any_change(verb) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # the head is not targeted
    before = state(model)
    with pytest.warns(UserWarning, match="skipping 0.weight"):
        with pytest.raises(ValueError, match=r"no targeted layer can take pattern 2:4: 0\.weight"):
            _run(verb, model, inplace=True)
    assert_same(state(model), before)
    assert get_mask(model[0]) is None


# -- checkpoints and the interrupted marker ----------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_interrupted_in_place_rolls_back_marks_and_resumes(
    method, calib, reference, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "ck"
    model = small_llama()
    dense = state(model)
    want, details = reference(method)
    interrupt_at(monkeypatch, 10)  # block 0 done, 2 of block 1's 7 layers pruned
    with pytest.warns(UserWarning, match="interrupted with 1 of 3 stages pruned in place"):
        with pytest.raises(KeyboardInterrupt):
            oneshot(model, calib, method=method, inplace=True, checkpoint=folder, progress=False)
    monkeypatch.undo()
    assert getattr(model, MARKER) == {
        "done_blocks": 1,
        "of": 3,
        "done": ["block-0000"],
        "next": "block-0001",
        "checkpoint": str(folder),
    }
    now = state(model)  # block 0 pruned as in the full run, block 1 rolled back, block 2 dense
    for key, value in now.items():
        assert torch.equal(value, want[key] if ".layers.0." in key else dense[key]), key
    assert not any("_mask" in key for key in now if ".layers.0." not in key)

    with pytest.raises(ValueError, match="interrupted oneshot .1 of 3 stages done"):
        oneshot(model, calib, method=method, inplace=True, progress=False)  # no checkpoint
    report = oneshot(model, calib, method=method, inplace=True, checkpoint=folder, progress=False)
    assert_same(state(model), want)
    assert report.details["allocated"] == details["allocated"]
    assert report.details["checkpoint"]["resumed_stages"] == 1
    assert not hasattr(model, MARKER)


def test_interrupted_copy_leaves_the_model_alone_and_resumes_in_a_fresh_model(
    calib, reference, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "ck"
    model = small_llama()
    dense = state(model)
    want, details = reference("wanda", allocation="owl", owl_lambda=0.2)
    interrupt_at(monkeypatch, 17)  # blocks 0 and 1 done
    with pytest.raises(KeyboardInterrupt):
        oneshot(model, calib, allocation="owl", owl_lambda=0.2, checkpoint=folder, progress=False)
    monkeypatch.undo()
    assert_same(state(model), dense)
    assert not hasattr(model, MARKER)
    meta = json.loads((folder / "oneshot.json").read_text())
    assert list(meta["done"]) == ["block-0000", "block-0001"]

    def no_owl_pass(*args):
        raise AssertionError("the OWL allocation is read from the checkpoint")

    monkeypatch.setattr(oneshot_module._Pruner, "owl", no_owl_pass)
    report = oneshot(
        small_llama(), calib, allocation="owl", owl_lambda=0.2, checkpoint=folder, progress=False
    )
    assert_same(state(report.model), want)
    assert report.details["allocated"] == details["allocated"]
    assert len(set(details["allocated"].values())) == 3  # OWL gave the blocks different sparsities


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import prunekit.calibrate.progress as progress
from prunekit.calibrate.oneshot import oneshot
from test_oneshot_resume import make_calib, small_llama

real = progress._replace
def replace(tmp, final):
    real(tmp, final)
    if final.name == "block-0001.safetensors":  # the file is in place, the JSON not yet updated
        os.kill(os.getpid(), signal.SIGKILL)
progress._replace = replace
oneshot(small_llama(), make_calib(), method="sparsegpt", checkpoint=sys.argv[1], progress=False)
"""


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(
    calib, reference, tmp_path
) -> None:
    folder = tmp_path / "ck"
    out = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT.format(tests=str(TESTS)), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    meta = json.loads((folder / "oneshot.json").read_text())
    assert list(meta["done"]) == ["block-0000"]  # block 1's file exists but does not count
    assert (folder / "block-0001.safetensors").exists()
    report = oneshot(small_llama(), calib, method="sparsegpt", checkpoint=folder, progress=False)
    assert_same(state(report.model), reference("sparsegpt")[0])
    assert report.details["checkpoint"] == {"folder": str(folder), "resumed_stages": 1, "stages": 3}
    assert not [p for p in os.listdir(folder) if ".tmp-" in p]


@pytest.mark.parametrize("sequential", [True, False])
def test_finished_checkpoint_loads_without_calibration(
    sequential, calib, tmp_path, monkeypatch
) -> None:
    folder = tmp_path / "ck"
    first = oneshot(
        small_llama(),
        calib,
        method="sparsegpt",
        sequential=sequential,
        checkpoint=folder,
        progress=False,
    )
    for name in ("run_sequential", "collect_input_stats", "sparsegpt_prune_shared"):
        monkeypatch.setattr(oneshot_module, name, lambda *a, **k: pytest.fail("recomputed"))
    again = oneshot(
        small_llama(),
        calib,
        method="sparsegpt",
        sequential=sequential,
        checkpoint=folder,
        progress=False,
    )
    assert_same(state(again.model), state(first.model))
    assert again.details["checkpoint"]["resumed_stages"] == (3 if sequential else 1)


@pytest.fixture(scope="module")
def finished(calib, tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "ck"
    oneshot(small_llama(), calib, method="wanda", checkpoint=folder, progress=False)
    return folder


def _damage(folder: Path, how: str) -> None:
    if how == "flip":
        path = folder / "block-0001.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "json":
        meta = json.loads((folder / "oneshot.json").read_text())
        del meta["done"]["block-0001"]["sha256"]
        (folder / "oneshot.json").write_text(json.dumps(meta))
    elif how == "dtype":
        from safetensors.torch import load_file, save_file

        path = folder / "block-0001.safetensors"
        tensors = load_file(str(path))
        name = "model.layers.1.mlp.up_proj.weight"
        tensors[name] = tensors[name].half()
        save_file(tensors, str(path))
        meta = json.loads((folder / "oneshot.json").read_text())
        from prunekit.compress.durable import sha256_file

        meta["done"]["block-0001"]["sha256"] = sha256_file(path)
        (folder / "oneshot.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "how,kwargs,message",
    [
        ("flip", {}, r"block-0001\.safetensors: checksum differs"),
        ("json", {}, r"'done\.block-0001\.sha256': expected a SHA-256"),
        ("dtype", {}, r"'model\.layers\.1\.mlp\.up_proj\.weight' is F16 \[64, 32\], expected F32"),
        (
            None,
            {"sparsity": 0.6},
            r"another oneshot run \(sparsity: checkpoint 0\.5, this call 0\.6\)",
        ),
        (None, {"model": "other block 0"}, r"weights in stage block-0000 are neither"),
    ],
)
def test_bad_checkpoint_is_refused_before_any_change(
    how, kwargs, message, finished, calib, tmp_path
) -> None:
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(finished, folder)
    if how:
        _damage(folder, how)
    model = small_llama()
    if kwargs.pop("model", None):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    before = state(model)
    with pytest.raises(ValueError, match=message):
        oneshot(
            model, calib, method="wanda", inplace=True, checkpoint=folder, progress=False, **kwargs
        )
    assert_same(state(model), before)
    assert not hasattr(model, MARKER)


class BlocksAndRest(nn.Module):
    """Three blocks, a projection outside them (the "rest" stage) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(torch.relu(self.proj(x)))


def test_interrupted_in_the_layers_outside_the_blocks_resumes(tmp_path, monkeypatch) -> None:
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = state(oneshot(BlocksAndRest(), data, method="sparsegpt", progress=False).model)
    model = BlocksAndRest()
    interrupt_at(monkeypatch, 4)  # the three blocks done, then the projection
    with pytest.warns(UserWarning, match="3 of 4 stages pruned in place .rest onwards"):
        with pytest.raises(KeyboardInterrupt):
            oneshot(
                model, data, method="sparsegpt", inplace=True, checkpoint=tmp_path, progress=False
            )
    monkeypatch.undo()
    assert getattr(model, MARKER)["next"] == "rest" and get_mask(model.proj) is None
    report = oneshot(
        model, data, method="sparsegpt", inplace=True, checkpoint=tmp_path, progress=False
    )
    assert_same(state(model), want)
    assert report.details["checkpoint"] == {
        "folder": str(tmp_path),
        "resumed_stages": 3,
        "stages": 4,
    }
