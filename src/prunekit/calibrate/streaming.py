"""One-shot pruning of a Hugging Face checkpoint larger than memory, block by block from its
safetensors shards.

:func:`oneshot_from_pretrained` never builds the whole model. It

1. builds the model's skeleton on the ``meta`` device (no memory) and, for real, only what runs
   before the first block and is not a block (embeddings, rotary tables, final norm, head:
   ``from_config`` with zero blocks, then the checkpoint's tensors for them);
2. runs the calibration samples up to the first block and keeps the block inputs (the
   activations); above ``max_activation_mb`` they spill to safetensors files in a temporary
   folder and are read back one sample at a time;
3. for each block: loads its tensors from the shards, gathers the statistics (Wanda's norms,
   SparseGPT's Hessians) over the samples, prunes it exactly as :func:`prunekit.oneshot` does,
   runs it again for the next block's inputs, writes its pruned tensors (zeros baked in) to
   its own output shard at once, and returns it to ``meta``;
4. copies the tensors outside the blocks unchanged into a last shard and writes
   ``model.safetensors.index.json``, ``config.json`` and the source folder's other files, so the
   output is a sharded folder that ``from_pretrained`` loads.

Peak memory, roughly: ``non-block weights + 2 x one block (its tensors, and the largest
tensor read from a shard) + SparseGPT's per-layer work (about 4 x in^2 float32 and a float64
in^2 Hessian sum per layer of the block) + activations (2 x samples x seq_len x hidden x 4
bytes, or one sample's when spilled) + the Python / torch runtime``; see docs/distributed.md
for measured figures.

The result equals ``prunekit.oneshot(model, calib, ...)`` followed by ``finalize`` on the same
model loaded whole (same operations in the same order; the tests check it bit for bit).
Supported: uniform, OWL and sensitivity allocation and ``per_layer`` overrides (the last two
unstructured only), unstructured and N:M, methods ``magnitude``, ``wanda`` and ``sparsegpt``,
models whose targeted layers all sit in the repeated blocks (the default for causal LMs, whose
head is not targeted).

The allocations cost a first streamed pass, each block read from the shards once more:

* OWL: every block run once more on the dense activations (its outlier ratio needs the block's
  weights and its input norms only);
* sensitivity (the measurement of ``oneshot``, ``analysis.sensitivity.sequential_damage``, with
  the grid's ``g`` sparsities): the calibration activations run
  through every block (dense for the statistics, then at the target sparsity), and the
  calibration subsample (16 samples) is carried in ``L + 1 + L x (g - 1)`` versions for ``L``
  blocks (the reference entering each block, each block at each other sparsity), every version
  run through each later block when that block is loaded: about ``L^2 g / 2`` block runs on the
  subsample, as in memory, and at the end ``L x (g + 1)`` runs of the model's tail (final norm and
  head) on it. Those versions take ``(L + 1 + L (g - 1)) x subsample x seq_len x hidden x 4``
  bytes, spilled to disk like the activations (``max_activation_mb``); while a block is
  measured its weights at every grid sparsity are held too (``g + 1`` copies of one block).
  The result is the in-memory allocation (tests: bit for bit).

Then the first block's inputs are captured again and the pruning pass runs.

Under ``torch.distributed`` (``torchrun``) each rank holds the activations of its own share of
the samples (the activation term of the peak memory above divides by the number of ranks),
reads every block, takes part in the reductions of :func:`prunekit.oneshot` (the sensitivity
pass's versions at the other sparsities are spread over the ranks too), and rank 0 alone writes
``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibrate.data import CalibrationSet, calibration
from prunekit.calibrate.oneshot import (
    METHODS,
    _block_targets,
    _owl_ratio,
    _Pruner,
    _reduced,
    round_nm_allocation,
)
from prunekit.calibrate.precision import floating_dtype, resolve_calibration_dtype, resolved_name
from prunekit.calibrate.sequential import (
    _hidden,
    _with_hidden,
    call_block,
    capture_block_inputs,
    find_blocks,
)
from prunekit.calibrate.stats import InputStats
from prunekit.compress.durable import fsync_path
from prunekit.distributed import barrier, is_distributed, is_main, rank, shard_samples
from prunekit.masks import remove_mask
from prunekit.patterns import NM, Unstructured, parse_pattern
from prunekit.prune import _check_choice, _check_sparsity, _resolve_sparsity
from prunekit.scope import owl_allocation
from prunekit.targets import per_layer_overrides, resolve_targets

INDEX = "model.safetensors.index.json"


def _shard_map(source: Path) -> dict[str, str]:
    """Tensor name -> shard file of a Hugging Face folder (sharded or a single file)."""
    index = source / INDEX
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = source / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{source}: neither {INDEX} nor model.safetensors found")
    with safe_open(str(single), framework="pt") as f:
        return {name: single.name for name in f.keys()}


class _Reader:
    """Reads tensors from the shards, keeping one shard open at a time."""

    def __init__(self, source: Path, shard_map: dict[str, str]) -> None:
        self.source, self.map = source, shard_map
        self._file: str | None = None
        self._handle: Any = None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.map:
            raise ValueError(f"{self.source}: the checkpoint has no tensor {name!r}")
        file = self.map[name]
        if file != self._file:
            self._handle = safe_open(str(self.source / file), framework="pt")
            self._file = file
        return self._handle.get_tensor(name)


class _Activations:
    """The hidden states of every sample; in safetensors files (read back one at a time) once
    they pass ``limit`` bytes."""

    def __init__(self, limit: int | None, folder: Path) -> None:
        self.limit, self.folder = limit, folder
        self.items: list[Any] = []
        self.bytes = 0
        self.spilled = 0

    def put(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.limit is not None and self.bytes + size > self.limit:
            path = self.folder / f"act-{index:06d}-{self.spilled:08d}.safetensors"
            save_file({"x": tensor}, str(path))
            self.spilled += 1
            item: Any = path
        else:
            self.bytes += size
            item = tensor
        if index < len(self.items):
            old = self.items[index]
            if isinstance(old, Path):
                old.unlink(missing_ok=True)
            else:
                self.bytes -= old.numel() * old.element_size()
            self.items[index] = item
        else:
            self.items.append(item)

    def get(self, index: int) -> torch.Tensor:
        item = self.items[index]
        return load_file(str(item))["x"] if isinstance(item, Path) else item


def _skeleton(source: Path, reader: _Reader) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model with real non-block modules (loaded) and ``meta`` blocks."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
    with torch.device("meta"):
        full = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    found = find_blocks(full)
    if found is None:
        raise ValueError(f"{type(full).__name__} has no repeated blocks (nn.ModuleList)")
    blocks_name, meta_blocks = found
    n_layers = len(meta_blocks)
    shell_config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    shell_config.num_hidden_layers = 0
    shell = transformers.AutoModelForCausalLM.from_config(shell_config).to(dtype)
    parent_name, _, child = blocks_name.rpartition(".")
    parent = shell.get_submodule(parent_name) if parent_name else shell
    setattr(parent, child, meta_blocks)
    for module in shell.modules():  # forward reads the layer count from the config
        if getattr(module, "config", None) is shell_config:
            module.config = config
    if hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = n_layers
    prefix = f"{blocks_name}."
    state = shell.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in state.items():
            if not name.startswith(prefix) and name in reader.map:
                tensor.copy_(reader.get(name))
    tied = getattr(config, "tie_word_embeddings", False)
    if tied and hasattr(shell, "tie_weights"):
        shell.tie_weights()
    return shell.eval(), blocks_name, meta_blocks


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``): without it a block's freed
    tensors stay in the process's heap and the resident size creeps up block after block
    (measured: +170 MB over 8 blocks of 25 MB). No-op where glibc is not the allocator."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_block(block: nn.Module, key_prefix: str, reader: _Reader) -> None:
    """Put the block's tensors from the shards into its ``meta`` parameters (no extra copy)."""
    names = list(block.state_dict(keep_vars=True))
    tensors = {name: reader.get(key_prefix + name) for name in names}
    block.load_state_dict(tensors, strict=True, assign=True)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, path)
    return sum(v.numel() * v.element_size() for v in tensors.values())


@torch.no_grad()
def oneshot_from_pretrained(
    source: str | os.PathLike,
    calib: Any,
    out: str | os.PathLike,
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    targets: Any = None,
    ignore: Any = None,
    *,
    allocation: str = "uniform",
    per_layer: dict[str, float] | None = None,
    sensitivity_grid: Any = None,
    scope: str | None = None,
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    block_size: int = 128,
    damp: float = 0.01,
    seed: int = 0,
    calibration_dtype: str | torch.dtype | None = "auto",
    max_activation_mb: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune the Hugging Face checkpoint in ``source`` block by block and write it to ``out``.

    Args:
        source: a Hugging Face causal LM folder (config.json, safetensors shards or one file).
        calib: calibration samples (as :func:`prunekit.oneshot` takes them: token id tensors,
            dicts of model inputs, or a :class:`prunekit.calibrate.CalibrationSet`).
        out: the output folder (sharded safetensors + index, config, the source's other files);
            written under a temporary name and renamed when complete.
        method, sparsity, pattern, targets, ignore, scope, block_size, damp, seed: as in
            :func:`prunekit.oneshot`.
        allocation: ``"uniform"`` or ``"owl"`` (as in :func:`prunekit.oneshot`, with
            ``owl_threshold`` and ``owl_lambda``): a first streamed pass over the blocks (each
            loaded from the shards, run on the dense activations, its outlier ratio kept) sets
            the per-block sparsities, then the pruning pass runs; the cost is one more read of
            the checkpoint and one more dense forward of every block. ``"sensitivity"``: a
            first streamed pass measures ``oneshot``'s damage curves (cost in the module doc;
            ``sensitivity_grid`` as in :func:`prunekit.oneshot`); unstructured only.
        per_layer: ``{pattern: sparsity}`` overrides, as in :func:`prunekit.oneshot`
            (unstructured only), e.g. an allocation measured elsewhere.
        calibration_dtype: as in :func:`prunekit.oneshot` (default ``"auto"``: bfloat16 for a
            float32 checkpoint on a CPU with native bfloat16, else no autocast); bfloat16 runs
            the block forwards of the pruning (and OWL) pass under ``torch.autocast``; the
            statistics stay float32 / float64 and the activations keep the checkpoint's dtype.
        max_activation_mb: keep at most this many MB of activations in memory; the rest spill
            to a temporary folder beside ``out`` (None: all in memory).
        overwrite: replace an existing ``out``.

    Under ``torch.distributed`` (``torchrun``; every rank passes the same arguments) each rank
    keeps the activations of its contiguous share of the samples only, the statistics are
    summed over the ranks and the SparseGPT solves spread over them, exactly as in
    :func:`prunekit.oneshot`; every rank reads the blocks from ``source`` (which must be
    visible to all) and rank 0 alone writes ``out``. The result equals one process's.

    Returns:
        A summary: ``{"blocks", "targets", "sparsity", "allocation", "calibration_dtype",
        "allocated", "fallbacks", "activations_spilled", "shards", "bytes_written"}``.

    Example:
        >>> oneshot_from_pretrained("llama-70b", calib, "llama-70b-2of4", method="sparsegpt",
        ...                         pattern="2:4")  # doctest: +SKIP
    """
    source, out = Path(source), Path(out)
    _check_choice("method", method, METHODS)
    _check_choice("allocation", allocation, ("uniform", "owl", "sensitivity"))
    parsed = parse_pattern(pattern)
    if not isinstance(parsed, (Unstructured, NM)):
        raise ValueError(f"oneshot_from_pretrained supports unstructured and N:M, not {pattern}")
    sparsity = _resolve_sparsity(sparsity, parsed)
    scope = scope or ("row" if method == "wanda" else "local")
    if allocation == "owl":
        owl_allocation([0.0], [1], sparsity, owl_lambda)  # validates lambda against sparsity
    if (per_layer or allocation == "sensitivity") and not isinstance(parsed, Unstructured):
        raise ValueError("per_layer and allocation='sensitivity' work with unstructured sparsity")
    resolve_calibration_dtype(calibration_dtype, "cpu", None)  # ValueError before any work
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if not isinstance(calib, CalibrationSet):
        calib = calibration(calib)
    if len(calib) == 0:
        raise ValueError("calib holds no sample")
    # token tensors as keyword inputs, so the model runs without a KV cache (use_cache=False)
    samples = [{"input_ids": s} if isinstance(s, torch.Tensor) else s for s in calib]
    local = shard_samples(samples)  # under torch.distributed: this rank's contiguous share
    writer = is_main()  # only rank 0 writes the output
    progress = progress and writer

    shard_map = _shard_map(source)
    reader = _Reader(source, shard_map)
    model, blocks_name, blocks = _skeleton(source, reader)
    # blocks load on the CPU, in the checkpoint's dtype (the skeleton's)
    model_dtype = floating_dtype(model)
    compute_dtype = resolve_calibration_dtype(calibration_dtype, "cpu", model_dtype)
    chosen = resolve_targets(model, targets, ignore)
    groups, rest = _block_targets(blocks_name, len(blocks), chosen)
    if rest:
        names = ", ".join(t.name for t in rest)
        raise ValueError(
            f"oneshot_from_pretrained prunes the layers inside {blocks_name} only; these targets "
            f"are outside: {names}; ignore them (ignore=[...]) or use prunekit.oneshot"
        )
    overrides = per_layer_overrides(chosen, per_layer)
    for key, value in overrides.items():
        _check_sparsity(value, f"per_layer[{key!r}]")
    pruner = _Pruner(
        method,
        parsed,
        scope,
        sparsity,
        allocation,
        owl_threshold,
        owl_lambda,
        block_size,
        damp,
        seed,
        False,
    )
    pruner.per_layer = dict(overrides)
    n = len(blocks)
    barrier()  # every rank has checked ``out`` before rank 0 may create it
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    spill = Path(tempfile.mkdtemp(prefix=".prunekit-activations-", dir=out.parent))
    weight_map: dict[str, str] = {}
    written = 0
    limit = None if max_activation_mb is None else int(max_activation_mb * 2**20)
    acts = _Activations(limit, spill)
    try:
        frames = _capture(model, blocks, local, acts)

        def visit(desc: str, on_block, dtype: torch.dtype | None = compute_dtype) -> None:
            """Load every block in turn, let ``on_block(index, block, run)`` work on it and
            return its outputs (the next block's inputs), then send it back to meta; the
            block forwards run under autocast to ``dtype`` (None: the checkpoint's dtype)."""
            bar = tqdm(range(n), desc=desc, unit="block", disable=not progress)
            for index in bar:
                block = blocks[index]
                _load_block(block, f"{blocks_name}.{index}.", reader)

                def run(block: nn.Module = block) -> list[torch.Tensor]:
                    outs = []
                    for i, (args, kwargs) in enumerate(frames):
                        a, k = _with_hidden(args, kwargs, acts.get(i))
                        outs.append(call_block(block, a, k, dtype))
                    return outs

                for i, hidden in enumerate(on_block(index, block, run)):
                    acts.put(i, hidden)
                block.to("meta")
                _release_freed_memory()

        per_block = [sparsity] * n
        if allocation == "owl":  # 1. the outlier ratios, block by block on dense activations
            ratios: dict[int, float] = {}

            def measure(index: int, block: nn.Module, run) -> list[torch.Tensor]:
                group = groups[index]
                if not group:
                    return run()
                with InputStats(group, {"norm"}, keep_parts=is_distributed()) as collected:
                    outs = run()
                ratios[index] = _owl_ratio(group, _reduced(collected, group, None), owl_threshold)
                return outs

            visit(f"oneshot {method} (streamed, OWL pass)", measure)
            used = sorted(ratios)
            sizes = [sum(t.weight().numel() for t in groups[i]) for i in used]
            owl = owl_allocation([ratios[i] for i in used], sizes, sparsity, owl_lambda)
            if isinstance(parsed, NM):
                owl = round_nm_allocation(owl, sizes, parsed)
            for i, s_ in zip(used, owl, strict=True):
                per_block[i] = s_
            frames = _capture(model, blocks, local, acts)  # the first block's inputs again

        elif allocation == "sensitivity":  # 1. the damage curves, block by block (module doc)
            free = [[t for t in group if t.name not in overrides] for group in groups]
            from prunekit.analysis.sensitivity import allocation_grid

            (spill / "sensitivity").mkdir()
            measured = _sensitivity_pass(
                model,
                blocks_name,
                blocks,
                free,
                samples,
                pruner,
                allocation_grid(sensitivity_grid, sparsity),
                # in the model's dtype, as oneshot's sensitivity measurement in memory
                lambda desc, on_block: visit(desc, on_block, None),
                _Activations(limit, spill / "sensitivity"),
            )
            pruner.per_layer.update(measured)
            frames = _capture(model, blocks, local, acts)  # the first block's inputs again

        total_shards = n + 1

        def prune_block(index: int, block: nn.Module, run) -> list[torch.Tensor]:
            nonlocal written
            group = groups[index]
            if group:
                stats: dict = {}
                if pruner.need:
                    with InputStats(group, pruner.need, keep_parts=is_distributed()) as collected:
                        run()
                    stats = _reduced(collected, group, pruner)
                pruner.prune(group, stats, per_block[index])
                for t in group:
                    remove_mask(t.module, t.param_name)  # zeros baked in
            outs = run()
            file = f"model-{index + 1:05d}-of-{total_shards:05d}.safetensors"
            key_prefix = f"{blocks_name}.{index}."
            tensors = {key_prefix + k: v for k, v in block.state_dict().items()}
            written += _write_shard(tmp / file, tensors) if writer else _nbytes(tensors)
            weight_map.update(dict.fromkeys(tensors, file))
            return outs

        visit(f"oneshot {method} (streamed)", prune_block)
        # 2. everything else, unchanged, straight from the source shards (rank 0)
        file = f"model-{total_shards:05d}-of-{total_shards:05d}.safetensors"
        others = [k for k in shard_map if not k.startswith(f"{blocks_name}.")]
        if writer:
            tensors = {k: reader.get(k) for k in others}
            written += _write_shard(tmp / file, tensors)
            del tensors
            weight_map.update(dict.fromkeys(others, file))
            index_json = {"metadata": {"total_size": written}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index_json, indent=2) + "\n")
            for item in source.iterdir():  # config, tokenizer, generation config, ...
                if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX:
                    shutil.copy2(item, tmp / item.name)
            fsync_path(tmp)
            if os.path.lexists(out):
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
            fsync_path(out.parent)
        barrier()  # every rank returns once ``out`` is complete
    finally:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)
    return {
        "blocks": n,
        "targets": len(chosen),
        "sparsity": sparsity,
        "allocation": allocation,
        "calibration_dtype": resolved_name(compute_dtype or model_dtype),
        "allocated": dict(pruner.allocated),
        "fallbacks": dict(pruner.fallbacks),
        "activations_spilled": acts.spilled,
        "shards": n + 1,
        "bytes_written": written if writer else None,
    }


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in tensors.values())


def _capture(
    model: nn.Module, blocks: nn.ModuleList, samples: list, acts: _Activations
) -> list[tuple[tuple, dict]]:
    """The first block's inputs of every sample: the hidden states into ``acts``, the rest of
    each call's arguments (masks, rotary tables) returned, with an empty hidden-state slot."""
    captured = capture_block_inputs(model, blocks, samples)
    frames = []
    for i, (args, kwargs) in enumerate(captured):
        acts.put(i, _hidden(args, kwargs))
        frames.append(_with_hidden(args, kwargs, torch.empty(0)))  # the rest, shared
    return frames


class _Tail(nn.Module):
    """Stands in for every block while the model's tail (final norm, head) runs on a given
    hidden state: returns it (as a one-tuple when the real blocks return tuples)."""

    def __init__(self, value: list, as_tuple: bool) -> None:
        super().__init__()
        self.value, self.as_tuple = value, as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.value[0],) if self.as_tuple else self.value[0]


def _sensitivity_pass(
    model: nn.Module,
    blocks_name: str,
    blocks: nn.ModuleList,
    groups: list[list[Any]],
    samples: list,
    pruner: _Pruner,
    grid: list[float],
    visit: Any,
    vault: _Activations,
) -> dict[str, float]:
    """``oneshot(allocation="sensitivity")``'s measurement (``sequential_damage`` with whole
    blocks) streamed: one pass over the blocks, each loaded once.

    The calibration activations flow through every block pruned at the target sparsity (the
    statistics of the next block), as in memory. The calibration subsample is carried along
    in several versions (states, kept in ``vault``, which spills to disk): ``ref[j]``, the
    hidden state entering block ``j`` with the blocks before it pruned at the target, then run
    through the dense blocks from ``j`` on; and ``var[j, s]``, block ``j``'s output pruned at
    sparsity ``s``, then run through the dense blocks after it. Every state passes through each
    later block when that block is loaded (dense), before it is pruned. At the end the model's
    tail turns each state into logits: the damage of block ``j`` at ``s`` is the KL divergence
    from ``ref[j]``'s logits to ``var[j, s]``'s (at the target, ``var[j, target]`` is
    ``ref[j + 1]``), per position, exactly as measured in memory. Under torch.distributed the
    ``var`` states are spread over the ranks (``ref`` runs on all) and the damages gathered.
    """
    from prunekit.analysis.sensitivity import (
        SUBSAMPLE,
        _divergence,
        _grid_matrices,
        _merge,
        _output_tensor,
        _reduced_stats,
        allocate_groups,
        layer_pruner_of,
        with_norms,
    )
    from prunekit.calibrate.stats import run_model
    from prunekit.distributed.jobs import gather_owned, job_owners
    from prunekit.masks import raw_parameter

    layer_pruner = layer_pruner_of(pruner)
    operating = pruner.sparsity
    points = sorted(set(grid) | {operating})
    need = {"sparsegpt": {"hessian"}, "wanda": {"norm"}}.get(pruner.method, set())
    measured = [j for j, group in enumerate(groups) if group]
    jobs = [(j, s) for j in measured for s in grid]
    owners = job_owners(len(jobs), {i for i, (_, s) in enumerate(jobs) if s == operating})
    me = rank()
    sub = _merge(samples[:SUBSAMPLE])
    captured = capture_block_inputs(model, blocks, sub)
    sub_frames = [_with_hidden(a, k, torch.empty(0)) for a, k in captured]
    states: dict[Any, int] = {}  # key -> index of its first batch in the vault
    nb = len(sub_frames)
    as_tuple = [False]

    def new_state(key: Any, hidden: list[torch.Tensor]) -> None:
        states[key] = len(vault.items)
        for tensor in hidden:
            vault.put(len(vault.items), tensor)

    def read(key: Any) -> list[torch.Tensor]:
        return [vault.get(states[key] + b) for b in range(nb)]

    def through(block: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for (args, kwargs), h in zip(sub_frames, hidden, strict=True):
            a, k = _with_hidden(args, kwargs, h)
            raw = block(*a, **k)
            as_tuple[0] = isinstance(raw, (tuple, list))
            out.append(raw[0] if as_tuple[0] else raw)
        return out

    current = [_hidden(a, k) for a, k in captured]  # the subsample entering the block
    del captured

    def measure_once(index: int, block: nn.Module, run) -> list[torch.Tensor]:
        nonlocal current
        group = groups[index]
        for key, base in list(states.items()):  # every earlier state through the dense block
            for b, h in enumerate(through(block, read(key))):
                vault.put(base + b, h)
        # ref[index]: the subsample entering this block (earlier blocks at the target) through
        # this block, dense, and the dense blocks after it
        new_state(("ref", index), through(block, current))
        if not group:
            current = through(block, current)
            return run()
        stats: dict = {}
        if need:
            with InputStats(group, need, keep_parts=is_distributed()) as collected:
                run()
            stats = _reduced_stats(collected, group, layer_pruner, len(points))
        pruned = _grid_matrices(layer_pruner, group, with_norms(group, stats), points)

        def set_weights(s: float) -> None:
            for t in group:
                param = raw_parameter(t.module, t.param_name)
                param.copy_(pruned[t.name][points.index(s)].to(param.dtype))

        for i, (j, s) in enumerate(jobs):
            if j == index and s != operating and owners[i] == me:
                set_weights(s)
                new_state(("var", index, s), through(block, current))
        set_weights(operating)
        current = through(block, current)
        return run()

    visit(f"oneshot {pruner.method} (streamed, sensitivity pass)", measure_once)
    new_state(("ref", len(blocks)), current)  # what var[last, target] would be

    # the tail: every block stands in for the final state; the model runs its norm and head
    holder: list = [None]
    saved = list(blocks)
    for j in range(len(blocks)):
        blocks[j] = _Tail(holder, as_tuple[0])
    try:

        def logits(key: Any) -> list[torch.Tensor]:
            out = []
            for b, item in enumerate(sub):
                holder[0] = vault.get(states[key] + b)
                tensor, _ = _output_tensor(run_model(model, item))
                out.append(tensor.detach())
            return out

        mine: dict[int, float] = {}
        for j in measured:
            wanted = [i for i, (jj, _) in enumerate(jobs) if jj == j and owners[i] == me]
            if not wanted:
                continue
            reference = logits(("ref", j))
            positions = sum(d.reshape(-1, d.shape[-1]).shape[0] for d in reference)
            for i in wanted:
                s = jobs[i][1]
                # var[j, target] is ref[j + 1] (ref[n]: the final state)
                other = logits(("ref", j + 1) if s == operating else ("var", j, s))
                total = 0.0
                for dense, tensor in zip(reference, other, strict=True):
                    total += float(_divergence(dense, tensor, "kl"))
                mine[i] = total / positions
    finally:
        for j, block in enumerate(saved):
            blocks[j] = block
    values = gather_owned(mine, owners)
    damage: dict[str, list[float]] = {}
    for (j, _), value in zip(jobs, values, strict=True):
        damage.setdefault(f"{blocks_name}.{j}", []).append(value)
    keyed = {f"{blocks_name}.{j}": groups[j] for j in measured}
    return allocate_groups(keyed, grid, damage, operating)
