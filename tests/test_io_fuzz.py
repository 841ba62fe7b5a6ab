"""Fault injection: generated corruptions of saved folders, and writers killed at every step.

* Corruptions (hypothesis): truncation, bit flips, safetensors header edits (dtype, shape,
  offsets, entries), JSON edits (a key removed, a value of another type, huge shapes, hostile
  class names and attributes in the structure record) of one file of a saved folder. Loading
  must end in one clear error (``SavedModelError`` or ``FileNotFoundError``, naming the file)
  with the target model unchanged, or in an exact load: never a silent difference.
* Hostile files without checksums (as an older prunekit wrote them, or with the checksums
  recomputed): the same edits must end in a clear error with the model unchanged, or in a model
  of the right architecture that runs.
* Kills: a forked writer (save, compressed save, save_pretrained) overwriting version A with
  version B is SIGKILLed at each file-system step it takes, and at random times; the target
  must then load as exactly A or exactly B, and the next save leaves nothing else behind.

Each test prints its counts (cases tried, how each ended); run with ``-s`` to see them.
"""

from __future__ import annotations

import builtins
import collections
import json
import os
import random
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prunekit
from conftest import SmallCNN, tiny_llama
from prunekit.compress.validate import SavedModelError, load_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
ALLOWED = (SavedModelError, FileNotFoundError)
FUZZ = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=True,
)
X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------- saved folders


def _masked_cnn(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return prunekit.prune(SmallCNN(), 0.7).model


def _structured_cnn() -> nn.Module:
    torch.manual_seed(1)
    return prunekit.prune_structured(SmallCNN(), X, ratio=0.5, progress=False).model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[dict[str, bytes], nn.Module]]:
    """Pristine folders (their bytes) and the models they hold."""
    root = tmp_path_factory.mktemp("pristine")
    masked = _masked_cnn()
    quantized = prunekit.quantize(_masked_cnn(), bits=8).model
    structured = _structured_cnn()
    out = {
        "plain": (prunekit.save(masked, root / "plain"), masked),
        "compressed": (prunekit.save(quantized, root / "c", compressed=True), quantized),
        "csr": (prunekit.save(masked, root / "csr", compressed=True, index="csr"), masked),
        "structured": (prunekit.save(structured, root / "s"), structured),
    }
    return {k: (_files(folder), model) for k, (folder, model) in out.items()}


# ------------------------------------------------------------------- corruptions


HOSTILE_CLASSES = [
    "os.system",
    "builtins.eval",
    "torch.nn.Linear",
    "prunekit.graph.modules.F",
    "prunekit.graph.modules.PrunableMultiheadAttention",
    "prunekit.graph.modules.PrunableMultiheadAttention.forward",
    "",
]
ODD_VALUES = [
    None,
    "x",
    0,
    -1,
    1,
    2**63,
    1.5,
    float("nan"),
    True,
    [],
    {},
    [2**40, 2**40],
    [-3],
    "2",
    {"forward": "x"},
]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _paths(v, (*prefix, i))
    return found


def _parent(doc: Any, path: tuple) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def corrupt(draw: Callable, files: dict[str, bytes]) -> tuple[str, str, bytes | None]:
    """One corruption of one file: (file name, what was done, new bytes or None = deleted)."""
    name = draw(st.sampled_from(sorted(files)))
    data = files[name]
    kinds = ["truncate", "bitflip", "delete"]
    if name.endswith(".safetensors"):
        kinds += ["header"] * 3
    if name.endswith(".json"):
        kinds += ["json"] * 4
    kind = draw(st.sampled_from(kinds))
    if kind == "delete":
        return name, kind, None
    if kind == "truncate":
        return name, kind, data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "bitflip":
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        return name, kind, bytes(raw)
    if kind == "header":
        header, body = _split_safetensors(data)
        tensor = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        edit = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add"]))
        entry = header[tensor]
        if edit == "dtype":
            entry["dtype"] = draw(
                st.sampled_from(["F32", "I32", "F16", "BF16", "U8", "I8", "F64", "XX"])
            )
        elif edit == "shape":
            entry["shape"] = draw(
                st.lists(st.sampled_from([0, 1, 2, 3, 7, 32, 256, 2**20, 2**40, -1]), max_size=4)
            )
        elif edit == "offsets":
            entry["data_offsets"] = draw(
                st.lists(st.integers(-5, len(body) + 5), min_size=0, max_size=3)
            )
        elif edit == "drop":
            del header[tensor]
        else:
            header[tensor + ".extra"] = dict(entry)
        return name, f"header {edit} {tensor}", _join_safetensors(header, body)
    doc = json.loads(data)
    paths = _paths(doc)
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["remove", "retype", "class", "attrs"]))
    parent = _parent(doc, path)
    if op == "remove":
        del parent[path[-1]]
    elif op == "retype":
        parent[path[-1]] = draw(st.sampled_from(ODD_VALUES))
    elif op == "class":
        changes = [p for p in paths if p and p[-1] == "module"]
        if changes:
            path = draw(st.sampled_from(changes))
            _parent(doc, path)["class"] = draw(st.sampled_from(HOSTILE_CLASSES))
        else:
            parent[path[-1]] = draw(st.sampled_from(HOSTILE_CLASSES))
    else:
        attrs = [p for p in paths if p and p[-1] == "attrs"]
        target = _parent(doc, draw(st.sampled_from(attrs))) if attrs else {}
        key = draw(st.sampled_from(["forward", "__class__", "training", "out_features", "groups"]))
        target.setdefault("attrs", {})[key] = draw(st.sampled_from(ODD_VALUES))
    return name, f"json {op} {'/'.join(map(str, path))}", json.dumps(doc).encode()


def _write(folder: Path, files: dict[str, bytes], name: str, data: bytes | None) -> None:
    folder.mkdir()
    for n, content in files.items():
        if n == name and data is None:
            continue
        (folder / n).write_bytes(data if n == name and data is not None else content)


def _strip_integrity(folder: Path) -> None:
    meta_path = folder / "prunekit.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(meta, dict) and "integrity" in meta:
        del meta["integrity"]
        meta_path.write_text(json.dumps(meta))


def _target() -> nn.Module:
    """A model with masks of its own, which a failed load must leave as it was."""
    torch.manual_seed(9)
    return prunekit.prune(SmallCNN(), 0.4, method="random", seed=4).model


def _check_load(
    folder: Path, original: nn.Module, counts: collections.Counter, exact: bool
) -> None:
    target = _target()
    before = _state(target)
    classes = [type(m) for m in target.modules()]
    try:
        loaded = prunekit.load(folder, target)
    except ALLOWED as exc:
        assert str(folder) in str(exc) or str(folder.name) in str(exc), str(exc)
        assert _same(_state(target), before) and classes == [type(m) for m in target.modules()]
        counts["clear error"] += 1
        return
    if exact:
        assert _same(_state(loaded), _state(original)), "loaded with a silent difference"
        counts["exact load"] += 1
    else:
        with torch.no_grad():
            assert loaded(X).shape == (2, 10)
        counts["loaded, runs"] += 1


@pytest.mark.parametrize("kind", ["plain", "compressed", "csr", "structured"])
@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "hostile"])
def test_corrupted_folders(saved, kind, checksums) -> None:
    files, original = saved[kind]
    counts: collections.Counter = collections.Counter()

    @FUZZ
    @given(st.data())
    def run(data) -> None:
        name, what, new = corrupt(data.draw, files)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "m"
            _write(folder, files, name, new)
            if not checksums:
                _strip_integrity(folder)
            counts["tried"] += 1
            _check_load(folder, original, counts, exact=checksums)

    run()
    print(f"\n{kind} ({'checksums' if checksums else 'hostile, no checksums'}): {dict(counts)}")
    assert counts["tried"] >= 25
    assert counts["clear error"] > 0


def test_hugging_face_folders(tmp_path) -> None:
    pytest.importorskip("transformers")
    model = prunekit.finalize(prunekit.prune(tiny_llama(), 0.7).model).eval()
    model = prunekit.quantize(model, bits=8, inplace=True).model
    want = _state(model)
    sources = {
        "compressed": _files(prunekit.save_pretrained(model, tmp_path / "c", compressed=True)),
        "plain": _files(prunekit.save_pretrained(model, tmp_path / "p")),
    }
    counts: collections.Counter = collections.Counter()

    @settings(FUZZ, max_examples=25)
    @given(st.sampled_from(sorted(sources)), st.data())
    def run(which, data) -> None:
        files = sources[which]
        name, what, new = corrupt(data.draw, files)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "m"
            _write(folder, files, name, new)
            counts["tried"] += 1
            try:
                loaded = prunekit.from_pretrained(folder)
            except ALLOWED as exc:
                assert str(folder) in str(exc), str(exc)
                counts["clear error"] += 1
                return
            assert _same(_state(loaded), want), f"silent difference after {what} of {name}"
            counts["exact load"] += 1

    run()
    print(f"\nHugging Face folders: {dict(counts)}")
    assert counts["tried"] >= 20 and counts["clear error"] > 0


# ------------------------------------------------------------------- kills


class _Killed(BaseException):
    pass


def _kill_at(step: int) -> Callable[[], None]:
    """Make the current (forked) process SIGKILL itself at its ``step``-th file-system call."""
    calls = {"n": 0}

    def tick() -> None:
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn):
        def wrapped(*args, **kwargs):
            tick()
            result = fn(*args, **kwargs)
            tick()
            return result

        return wrapped

    for name in ("replace", "rename", "mkdir", "fsync", "chmod", "unlink", "rmdir"):
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)
    real_open = builtins.open

    def opened(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = opened
    return lambda: calls["n"]


def _private_progress_lock() -> None:
    """Give a forked writer its own, thread-only tqdm lock: killed while a progress bar holds
    tqdm's inter-process lock, it would otherwise leave that lock taken and hang the next bar
    the test process draws (transformers' loading bar in from_pretrained)."""
    import threading

    import tqdm

    classes, seen = [tqdm.tqdm], set()
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        cls._lock = threading.RLock()
        classes.extend(cls.__subclasses__())


def _in_child(job: Callable[[], None], step: int | None, delay: float | None = None) -> str:
    """Run ``job`` in a forked process, killed at file-system step ``step`` or after ``delay``
    seconds; returns how it ended."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 0
        try:
            _private_progress_lock()
            if step is not None:
                _kill_at(step)
            job()
        except BaseException:  # noqa: BLE001 - report any failure through the exit code
            code = 3
        finally:
            os._exit(code)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    status = _wait(pid)
    if os.WIFSIGNALED(status):
        return "killed"
    assert os.WEXITSTATUS(status) == 0, f"the writer failed (exit {os.WEXITSTATUS(status)})"
    return "finished"


def _wait(pid: int, limit: float = 120.0) -> int:
    """The exit status of child ``pid``; a child still running after ``limit`` seconds (a hang)
    is killed and the test fails."""
    deadline = time.monotonic() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the forked writer did not finish within {limit:.0f} s")
        time.sleep(0.002)


def _steps(job: Callable[[], None]) -> int:
    """How many file-system steps ``job`` takes (counted in a forked child)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        try:
            _private_progress_lock()
            count = _kill_at(-1)
            job()
            os.write(write, str(count()).encode())
        finally:
            os._exit(0)
    os.close(write)
    _wait(pid)
    with os.fdopen(read) as f:
        return int(f.read())


WRITERS = ["save", "save_compressed", "save_pretrained", "recipe_checkpoint"]


def _checkpoint_writer():
    """A recipe stage checkpoint (model + stage.json in one folder): the record read back must
    belong to the weights read back."""
    from prunekit.recipes.runner import STAGE_FILE, StageResult, _write_checkpoint

    a, b = _masked_cnn(0), _masked_cnn(1)

    def write(model, path):
        tag = "a" if model is a else "b"
        result = StageResult("01-prune", "prune", {"sparsity": 0.5}, 0.0, {"version": tag})
        _write_checkpoint(path, model, result, chain=tag, inputs={"stage": tag})

    def read(path):
        if not path.exists():
            prunekit.compress.io.recover_interrupted(path)
        record = json.loads((path / STAGE_FILE).read_text())
        assert record["chain"] == record["metrics"]["version"]
        state = _state(prunekit.load(path / "model", SmallCNN()))
        state["_record"] = torch.tensor(ord(record["chain"]))
        return state

    return a, b, write, read


def _writer(kind: str, tmp_path: Path):
    """(version A, version B, write(model, path), read(path) -> state)."""
    if kind == "recipe_checkpoint":
        return _checkpoint_writer()
    if kind == "save_pretrained":
        pytest.importorskip("transformers")
        a = prunekit.finalize(prunekit.prune(tiny_llama(0), 0.5).model)
        b = prunekit.finalize(prunekit.prune(tiny_llama(1), 0.7).model)

        def write(model, path):
            prunekit.save_pretrained(model, path, overwrite=True, compressed=False)

        def read(path):
            """What from_pretrained reads, checksums included, without building the model
            (test_hugging_face_folders and the last check below build it)."""
            from prunekit.graph.hf import read_hf_metadata

            if not path.exists():
                prunekit.compress.io.recover_interrupted(path)
            assert read_hf_metadata(path)["integrity"]
            return load_tensors(path / "model.safetensors")[0]

        return a, b, write, read
    a, b = _masked_cnn(0), _masked_cnn(1)
    compressed = kind == "save_compressed"

    def write(model, path):
        prunekit.save(model, path, overwrite=True, compressed=compressed)

    def read(path):
        return _state(prunekit.load(path, SmallCNN()))

    return a, b, write, read


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked writer")
@pytest.mark.parametrize("kind", WRITERS)
def test_writers_killed_at_every_step(tmp_path, kind, monkeypatch) -> None:
    # a kill is not a power cut: flushing to disk changes nothing here but the time it takes
    # (each fsync is still a step at which the writer is killed)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    a, b, write, read = _writer(kind, tmp_path)
    target = tmp_path / "model"
    write(a, target)
    state_a = read(target)
    write(b, tmp_path / "b")
    state_b = read(tmp_path / "b")
    steps = _steps(lambda: write(b, target))
    assert steps > 5
    counts: collections.Counter = collections.Counter()
    for step in range(1, steps + 1):  # the target holds version A here
        ended = _in_child(lambda: write(b, target), step)
        state = read(target)
        version = "old" if _same(state, state_a) else "new" if _same(state, state_b) else None
        assert version, f"{kind}: killed at step {step}, the target is neither version"
        counts[f"{ended}, {version}"] += 1
        write(a, target)  # the next save repairs what the kill left
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "model"], step
    rng = random.Random(0)
    for _ in range(4):  # and at random times, inside library calls too
        ended = _in_child(
            lambda: [write(m, target) for m in (b, a) * 3], None, rng.uniform(0.001, 0.05)
        )
        state = read(target)
        assert _same(state, state_a) or _same(state, state_b)
        counts[f"random time, {ended}"] += 1
    if kind == "save_pretrained":
        assert prunekit.from_pretrained(target) is not None
    print(f"\n{kind}: {steps} kill points; {dict(counts)}")
    assert counts["killed, old"] > 0 and counts["killed, new"] > 0
