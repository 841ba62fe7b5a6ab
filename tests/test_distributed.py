"""Two gloo processes against one: oneshot masks and weights, data-parallel finetune and the
gradual pruner, rank-0-only checkpoint writes (prunekit.distributed).

The two ranks are forked from the test process (``tests/distributed_worker.py``), so they start
without re-importing torch; each group of calls runs once per module and the tests read its
results. Skipped where gloo or ``fork`` is unavailable.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

pytest.importorskip("transformers")


def _gloo_reason() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available in this build"
    if "fork" not in multiprocessing.get_all_start_methods():
        return "the test forks its two ranks; fork is not available here"
    return None


pytestmark = pytest.mark.skipif(_gloo_reason() is not None, reason=str(_gloo_reason()))


def _launch(tmp: Path, group: str) -> tuple[dict, dict, dict]:
    import torch.multiprocessing as mp

    worker.tiny_llama()  # import the model code once, in the parent: the forks inherit it
    try:
        mp.start_processes(
            worker.worker,
            args=(tmp, group, f"file://{tmp}/rendezvous"),
            nprocs=2,
            start_method="fork",
        )
    except RuntimeError as exc:  # the group could not be formed at all
        if "gloo" in str(exc).lower() and "connect" in str(exc).lower():
            pytest.skip(f"gloo cannot initialise here: {exc}")
        raise

    def load(name: str) -> dict:
        return torch.load(tmp / f"{group}-{name}.pt", weights_only=False)

    return load("rank0"), load("rank1"), load("ref")


@pytest.fixture(scope="module")
def oneshot_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist-oneshot")
    return (*_launch(tmp, "oneshot"), tmp)


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist-train")
    return (*_launch(tmp, "train"), tmp)


def _masks(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(":mask")}


def _assert_same(a: dict, b: dict, exact: bool, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact or key.endswith(":mask"):
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize(
    "case",
    [
        "wanda",
        "magnitude",
        "wanda-owl",
        "wanda-whole",
        "wanda-sensitivity",
        "magnitude-sensitivity",
        "wanda-sensitivity-whole",
    ],
)
def test_oneshot_bit_identical(oneshot_runs, case):
    """Wanda (with and without OWL, sequential or whole) and magnitude: both ranks end with the
    single-process masks and weights, bit for bit."""
    rank0, rank1, ref, _ = oneshot_runs
    assert _masks(ref[case]), "the reference pruned nothing"
    assert any(not m.all() for m in _masks(ref[case]).values())
    _assert_same(rank0[case], ref[case], exact=True)
    _assert_same(rank1[case], ref[case], exact=True)


@pytest.mark.parametrize(
    "case",
    ["sparsegpt", "sparsegpt-2:4", "sparsegpt-whole", "sparsegpt-sensitivity", "sparsegpt-owl"],
)
def test_oneshot_sparsegpt(oneshot_runs, case):
    """SparseGPT: identical on both ranks (solved by one, broadcast) and, since the float64
    Hessian sums are exact here, the same masks and weights as one process, bit for bit."""
    rank0, rank1, ref, _ = oneshot_runs
    _assert_same(rank0[case], rank1[case], exact=True)
    _assert_same(rank0[case], ref[case], exact=True)
    # both ranks sent something: the Hessians were reduced to owners, the solves shared
    assert rank0[case + "/traffic"]["bytes"] > 0 and rank1[case + "/traffic"]["bytes"] > 0


@pytest.mark.parametrize("case", ["wanda", "sparsegpt", "magnitude"])
def test_sensitivity_allocation_is_data_parallel(oneshot_runs, case):
    """allocation="sensitivity": each rank gathers the block statistics on its share of the
    samples (2 and 3 of 5) and runs part of the damage measurements; every rank ends with the
    single-process allocation, exactly (the damages are each computed by one rank, as one
    process computes them, and gathered)."""
    rank0, rank1, ref, _ = oneshot_runs
    name = f"{case}-sensitivity"
    allocated = ref[name + "/allocated"]
    assert len(set(allocated.values())) > 1, "the allocation is uniform: nothing was tested"
    assert rank0[name + "/allocated"] == allocated and rank1[name + "/allocated"] == allocated
    assert ref[name + "/seen"]["samples"] == [5]
    assert rank0[name + "/seen"]["samples"] == [2] and rank1[name + "/seen"]["samples"] == [3]
    runs = [rank0[name + "/seen"]["runs"], rank1[name + "/seen"]["runs"]]
    single = ref[name + "/seen"]["runs"]
    # the runs at the target sparsity (the next block's reference) happen on both ranks, the
    # other grid points on one each
    assert max(runs) < single and sum(runs) > single


@pytest.mark.parametrize("case", ["wanda-owl", "sparsegpt-owl"])
def test_owl_allocation_matches_single_process(oneshot_runs, case):
    rank0, rank1, ref, _ = oneshot_runs
    allocated = ref[case + "/allocated"]
    assert len(set(allocated.values())) > 1
    assert rank0[case + "/allocated"] == allocated == rank1[case + "/allocated"]


def test_structured_sensitivity_allocation_is_shared(oneshot_runs):
    """prune_structured(allocation="sensitivity"): the damage points are measured part on each
    rank and gathered, so both ranks cut the single-process widths and weights, bit for bit."""
    rank0, rank1, ref, _ = oneshot_runs
    widths = [w.shape[0] for k, w in ref["structured"].items() if k.endswith("weight")]
    assert widths[0] != widths[1] and widths[2] == 4  # not uniform: the allocation chose
    _assert_same(rank0["structured"], ref["structured"], exact=True)
    _assert_same(rank1["structured"], ref["structured"], exact=True)
    runs = [rank0["structured/runs"], rank1["structured/runs"]]
    assert max(runs) < ref["structured/runs"] and sum(runs) == ref["structured/runs"]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("mode", ["output", "proxy"])
def test_sensitivity_curves_are_shared(oneshot_runs, mode, method):
    """prunekit.sensitivity: in output mode the model runs of the layer x sparsity grid are
    spread over the ranks and gathered; in proxy mode each rank runs its share of the samples
    and the Hessians are summed. Either way both ranks hold the single-process curves exactly,
    each rank having done only part of the work."""
    rank0, rank1, ref, _ = oneshot_runs
    key = f"curves-{mode}-{method}"
    curves = ref[key]
    assert len(curves) > 4 and any(v[1] > v[0] > 0 for v in curves.values())
    assert rank0[key] == curves == rank1[key]
    seen = [rank0[key + "/seen"], rank1[key + "/seen"], ref[key + "/seen"]]
    if mode == "output":
        runs = [s["runs"] for s in seen]
        assert max(runs[:2]) < runs[2] and runs[0] + runs[1] == runs[2]
    else:
        assert [s["samples"] for s in seen] == [[2], [3], [5]]


def test_oneshot_statistics_traffic(oneshot_runs):
    """Magnitude needs no statistics (no traffic); Wanda sends its norm vectors only."""
    rank0, _, _, _ = oneshot_runs
    assert rank0["magnitude/traffic"]["bytes"] == 0
    assert 0 < rank0["wanda/traffic"]["bytes"] < rank0["sparsegpt/traffic"]["bytes"]


def test_oneshot_checkpoint_written_by_rank0_only(oneshot_runs):
    rank0, rank1, ref, folder = oneshot_runs
    assert rank0["checkpoint/writes"], "rank 0 wrote no checkpoint"
    assert rank1["checkpoint/writes"] == []
    assert (folder / "oneshot-ck" / "oneshot.json").is_file()
    _assert_same(rank1["checkpoint"], ref["wanda"], exact=True)


@pytest.mark.parametrize("case", ["finetune", "pruner-magnitude", "pruner-movement"])
def test_finetune_matches_single_process(train_runs, case):
    """Data parallel finetune (each rank half of every batch, gradients averaged) ends as one
    process on the whole batches, within float tolerance; the ranks agree bit for bit and the
    pruned weights are exactly zero."""
    rank0, rank1, ref, _ = train_runs
    _assert_same(rank0[case], rank1[case], exact=True)
    _assert_same(rank0[case], ref[case], exact=False, atol=1e-5)
    for key, keep in _masks(rank0[case]).items():
        weight = rank0[case][key[: -len(":mask")]]
        assert not keep.all() and bool((weight[~keep] == 0).all()), key


@pytest.mark.parametrize("method", ["magnitude", "movement"])
def test_pruner_masks_agree_every_step(train_runs, method):
    rank0, rank1, ref, _ = train_runs
    steps = rank0[f"pruner-{method}/steps"]
    assert len(steps) == 8 and len(rank1[f"pruner-{method}/steps"]) == 8
    for mine, other, single in zip(
        steps, rank1[f"pruner-{method}/steps"], ref[f"pruner-{method}/steps"], strict=True
    ):
        assert mine.keys() == other.keys() == single.keys()
        for key in mine:
            assert torch.equal(mine[key], other[key]) and torch.equal(mine[key], single[key])
    final = next(iter(steps[-1].values()))
    assert abs(1 - final.float().mean().item() - 0.75) < 0.05


def test_finetune_history_and_checkpoint(train_runs):
    """The logged loss is the global batch's, and checkpoints are written by rank 0 only."""
    rank0, rank1, ref, folder = train_runs
    for mine, single in zip(rank0["finetune/history"], ref["finetune/history"], strict=True):
        assert mine["step"] == single["step"]
        assert mine["train_loss"] == pytest.approx(single["train_loss"], abs=1e-6)
    assert rank0["finetune/writes"] == ["1", "2"] and rank1["finetune/writes"] == []
    assert sorted(p.name for p in (folder / "finetune-ck").iterdir()) == ["epoch-000002"]


def test_finetune_with_distributed_sampler(train_runs):
    """A DataLoader with a DistributedSampler is not split again: each rank trains on its own
    rows, and the global batches equal the whole batches of one process."""
    rank0, rank1, ref, _ = train_runs
    _assert_same(rank0["sampler"], rank1["sampler"], exact=True)
    _assert_same(rank0["sampler"], ref["finetune"], exact=False, atol=1e-5)


def test_sync_masks_takes_rank0(train_runs):
    rank0, rank1, _, _ = train_runs
    assert torch.equal(rank1["sync"]["0.weight:mask"], rank0["sync"]["0.weight:mask"])
    assert bool((rank1["sync"]["0.weight"][~rank0["sync"]["0.weight:mask"]] == 0).all())
    keep = torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(rank1["sync"]["0.weight:mask"], keep)


@pytest.fixture(scope="module")
def stream_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist-stream")
    worker.tiny_llama(num_hidden_layers=3).save_pretrained(tmp / "llama", max_shard_size="40KB")
    return (*_launch(tmp, "stream"), tmp)


@pytest.mark.parametrize(
    "case", ["wanda", "sparsegpt-owl", "wanda-sensitivity", "sparsegpt-sensitivity"]
)
def test_streamed_oneshot_under_two_processes(stream_runs, case):
    """oneshot_from_pretrained on 2 ranks (each its share of the samples, statistics reduced,
    SparseGPT solves shared, OWL's ratios from reduced norms): rank 0 alone writes the folder,
    and it equals one process's output bit for bit."""
    from safetensors.torch import load_file

    rank0, rank1, ref, tmp_path = stream_runs
    assert len(rank0[case]["writes"]) == 4 and rank1[case]["writes"] == []
    assert rank0[case]["traffic"]["bytes"] > 0 and rank1[case]["traffic"]["bytes"] > 0
    two, one = tmp_path / f"stream-{case}", tmp_path / f"single-{case}"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for shard in one.glob("*.safetensors"):
        a, b = load_file(two / shard.name), load_file(shard)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), shard.name
    summary = rank0[case]["summary"]
    assert summary["allocated"] == ref[case]["allocated"] == rank1[case]["summary"]["allocated"]
    assert summary["bytes_written"] == ref[case]["bytes_written"]
    if case != "wanda":
        assert len(set(summary["allocated"].values())) > 1
    assert not list(tmp_path.glob(".*"))  # no temporary folder left by any rank


def _hf_folder_with_tokenizer(folder: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers")
    import transformers

    worker.tiny_llama().save_pretrained(folder)
    words = [f"w{i}" for i in range(60)]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    fast.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 60, (2000,), generator=gen)
    (folder.parent / "calib.txt").write_text(" ".join(words[i] for i in ids))
    return folder


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_no_rank_leaves_the_group_while_another_still_works(tmp_path):
    """A rank that tears the group down while rank 0 still works (writing ``--out``) can abort
    in gloo's teardown, and torchrun then kills rank 0 mid-write: ``launched`` waits for every
    rank before leaving (rank 1 leaves after rank 0's slower body ended)."""
    import torch.multiprocessing as mp

    mp.start_processes(worker.worker, args=(tmp_path, "launched", None, _free_port()),
                       nprocs=2, start_method="fork")  # fmt: skip
    rank0 = torch.load(tmp_path / "launched-rank0.pt")
    rank1 = torch.load(tmp_path / "launched-rank1.pt")
    assert rank0["joined"] and rank1["joined"]
    assert rank1["left"] >= rank0["body_done"]


def test_cli_oneshot_under_torchrun_environment(tmp_path):
    """``prunekit oneshot`` started in torchrun's environment (RANK, WORLD_SIZE, MASTER_*):
    it joins the group, rank 0 alone prints and writes --out, and the written model equals the
    single-process command's bit for bit (Wanda)."""
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from prunekit.cli import main

    source = _hf_folder_with_tokenizer(tmp_path / "llama")
    calib = str(tmp_path / "calib.txt")
    common = ["oneshot", str(source), "--method", "wanda", "--calib", calib]
    common += ["--n-samples", "6", "--seq-len", "16", "--out"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count: the same forward bits
    try:
        assert main([*common, str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(before)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [*common, str(tmp_path / "two")]
    mp.start_processes(
        worker.worker, args=(tmp_path, "cli", None, port, argv), nprocs=2, start_method="fork"
    )
    rank0 = torch.load(tmp_path / "cli-rank0.pt")
    rank1 = torch.load(tmp_path / "cli-rank1.pt")
    assert rank0["rc"] == 0 and rank1["rc"] == 0
    assert "wrote" in rank0["stdout"] and rank1["stdout"] == ""
    single = load_file(tmp_path / "single" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert single.keys() == two.keys()
    assert all(torch.equal(single[k], two[k]) for k in single)
    assert float((two["model.layers.0.mlp.up_proj.weight"] == 0).float().mean()) == 0.5


def test_latencies_that_steer_decisions_are_rank_0_s_on_every_rank(tmp_path):
    """A target_latency search, a recipe's served latency and a plain measure, under two ranks:
    only rank 0 times (rank 1 never calls bench), both get the same figures and so the same
    widths; an error in rank 0's measurement is raised on rank 1 too instead of a hang."""
    rank0, rank1, _ = _launch(tmp_path, "timing")
    assert rank0["bench_calls"] > 0 and rank1["bench_calls"] == 0
    for key in ("measured", "widths", "search", "served"):
        assert rank0[key] == rank1[key], key
    assert "accelerated" in rank0["served"]["1"]
    assert rank0["error"].startswith("ZeroDivisionError")
    assert rank1["error"] == "MeasurementFailed: rank 0's measurement failed: " + rank0["error"]
