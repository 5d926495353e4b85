"""spotrun.checkpoint: atomic commit, verification, fallback past torn checkpoints, keep-N,
round trips of every kind of state, the data position, preemption requests, background saves."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import ROOT, child_env
from torch.utils.data import DataLoader, TensorDataset

import spotrun.checkpoint as ckpt
from spotrun.checkpoint import (
    MANIFEST_NAME,
    Checkpointer,
    CheckpointError,
    ResumableLoader,
    ResumableSampler,
    complete_checkpoints,
    latest_checkpoint,
    state_hash,
    verify_checkpoint,
)
from spotrun.checkpoint import io as checkpoint_io
from spotrun.checkpoint.format import CRC_CHUNK, TMP_PREFIX, step_dirname


@pytest.fixture(autouse=True)
def _no_leftover_requests(monkeypatch: pytest.MonkeyPatch):
    for var in ("SPOTRUN_NOTICE_FILE", "SPOTRUN_PROGRESS_FILE", "SPOTRUN_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    ckpt._clear_requests()
    yield
    ckpt._clear_requests()


def small_setup(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: object) -> None:
    x = torch.randn(4, 8)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()  # type: ignore[attr-defined]


def saved(root: Path, steps: list[int], **kw) -> list[Path]:
    model, opt, sched = small_setup()
    ck = Checkpointer(model=model, optimizer=opt, scheduler=sched, root=root, keep=None, handle_signals=False, **kw)
    for s in steps:
        train_step(model, opt, sched)
        ck.save(s)
    ck.close()
    return [root / step_dirname(s) for s in steps]


# --- format: commit, verify, torn checkpoints, keep ------------------------------------------


def test_a_checkpoint_is_a_step_folder_with_a_manifest_of_sizes_and_checksums(tmp_path: Path) -> None:
    [path] = saved(tmp_path, [7])
    assert path.name == "000000000007"
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["format"] == 2 and manifest["step"] == 7 and manifest["created"] <= time.time()
    on_disk = {p.name for p in path.iterdir()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk and "state.pkl" in on_disk
    for rel, entry in manifest["files"].items():
        data = (path / rel).read_bytes()
        chunks = [data[i : i + CRC_CHUNK] for i in range(0, len(data), CRC_CHUNK)]
        assert entry == {"size": len(data), "crc32": "".join(f"{zlib.crc32(c):08x}" for c in chunks)}
    assert verify_checkpoint(path) and verify_checkpoint(path, deep=False)
    assert complete_checkpoints(tmp_path) == [path] and latest_checkpoint(tmp_path) == path
    assert not list(tmp_path.glob(TMP_PREFIX + "*"))


def _truncate(path: Path) -> None:
    f = path / "state.pkl"
    f.write_bytes(f.read_bytes()[:-10])


def _flip_a_byte(path: Path) -> None:
    f = next(path.glob("tensors-*.bin"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))  # same size: only the checksum can tell


def _drop_manifest(path: Path) -> None:
    (path / MANIFEST_NAME).unlink()


def _garbage_manifest(path: Path) -> None:
    (path / MANIFEST_NAME).write_bytes(b"\x00{not json")


def _manifest_of_another_step(path: Path) -> None:
    m = json.loads((path / MANIFEST_NAME).read_text())
    m["step"] += 1
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def _manifest_escaping_the_folder(path: Path) -> None:
    m = json.loads((path / MANIFEST_NAME).read_text())
    m["files"]["../outside"] = {"size": 0, "sha256": "0" * 64}
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def _missing_file(path: Path) -> None:
    next(path.glob("tensors-*.bin")).unlink()


@pytest.mark.parametrize(
    "tear",
    [
        _truncate,
        _flip_a_byte,
        _drop_manifest,
        _garbage_manifest,
        _manifest_of_another_step,
        _manifest_escaping_the_folder,
        _missing_file,
    ],
)
def test_a_torn_checkpoint_is_never_loaded_and_restore_falls_back(tmp_path: Path, tear) -> None:
    older, newest = saved(tmp_path, [1, 2])
    tear(newest)
    assert not verify_checkpoint(newest)
    assert latest_checkpoint(tmp_path) == older
    assert complete_checkpoints(tmp_path) == [older]

    model, opt, sched = small_setup(seed=99)
    ck = Checkpointer(model=model, optimizer=opt, scheduler=sched, root=tmp_path, handle_signals=False)
    assert ck.restore() == 1 and ck.restored_from == older


def test_restore_starts_fresh_when_nothing_is_complete(tmp_path: Path) -> None:
    first, second = saved(tmp_path, [1, 2])
    _drop_manifest(first)  # a save that died before its commit
    _truncate(second)
    (tmp_path / "000000000003").mkdir()  # an empty step folder
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    model, opt, sched = small_setup()
    before = state_hash(model)
    assert Checkpointer(model=model, optimizer=opt, root=tmp_path, handle_signals=False).restore() == 0
    assert state_hash(model) == before
    assert latest_checkpoint(tmp_path / "missing") is None and complete_checkpoints(tmp_path / "missing") == []
    assert not verify_checkpoint(tmp_path / "notes.txt") and not verify_checkpoint(tmp_path / "nope")


def test_a_corrupt_checkpoint_read_into_the_model_with_nothing_older_to_load_stops_restore(tmp_path: Path) -> None:
    """Restore reads straight into the live tensors; a flipped bit shows only once they are partly
    overwritten. With an older checkpoint that loads, it falls back (test above); with none, starting
    fresh from half-overwritten weights would be a silent mismatch, so restore refuses and says why."""
    for path in saved(tmp_path, [1, 2]):
        _flip_a_byte(path)
    model, opt, sched = small_setup()
    with pytest.raises(CheckpointError, match=r"000000000002 is corrupt .*partly read into the live model"):
        Checkpointer(model=model, optimizer=opt, root=tmp_path, handle_signals=False).restore()
    assert Checkpointer(root=tmp_path, state={"n": 0}, handle_signals=False).restore() == 0  # nothing live: fresh


def test_keep_n_deletes_the_oldest_and_superseded_torn_folders(tmp_path: Path) -> None:
    (tmp_path / "000000000000").mkdir(parents=True)  # torn, older than what will be committed
    dead = tmp_path / f"{TMP_PREFIX}000000000009-999999999-abcd"  # a dead writer's temp folder
    dead.mkdir()
    model, opt, sched = small_setup()
    ck = Checkpointer(model=model, optimizer=opt, root=tmp_path, keep=2, handle_signals=False)
    for s in range(1, 5):
        ck.save(s)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [step_dirname(3), step_dirname(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dirname(3), step_dirname(4)]


def test_a_step_is_committed_once(tmp_path: Path) -> None:
    model, opt, _ = small_setup()
    ck = Checkpointer(model=model, optimizer=opt, root=tmp_path, handle_signals=False)
    ck.extra["tag"] = "first"
    ck.save(5)
    ck.extra["tag"] = "second"
    ck.save(5)
    assert checkpoint_io.read_state(tmp_path / step_dirname(5))["state"]["tag"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == [step_dirname(5)]


def test_agent_functions_import_without_torch() -> None:
    code = (
        "import sys, spotrun.checkpoint as c; "
        "assert c.latest_checkpoint('/nonexistent') is None and c.MANIFEST_NAME == 'MANIFEST.json'; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=child_env(Path("/nonexistent")))


# --- state round trips ------------------------------------------------------------------------


def test_every_kind_of_state_round_trips(tmp_path: Path) -> None:
    shared = torch.arange(6, dtype=torch.float32)
    sd: OrderedDict = OrderedDict(w=torch.randn(3, 4).t(), tied=shared, also_tied=shared)  # non-contiguous
    sd._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    extra = {
        "module_state": sd,
        "bf16": torch.randn(5).to(torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "bool": torch.tensor([True, False]),
        "long": torch.tensor([2**40]),
        "np": np.arange(5, dtype=np.int16).reshape(5, 1),
        "np_scalar": np.float32(1.25),
        "py": [1, 2.5, "s", b"b", None, (1, 2), {3, 4}, frozenset({5}), 1 + 2j, {7: "int key"}],
        "torch_types": [torch.float16, torch.device("cpu"), torch.Size([2, 3])],
    }
    ck = Checkpointer(root=tmp_path, handle_signals=False)
    ck.extra.update(extra)
    ck.save(3)
    back = Checkpointer(root=tmp_path, handle_signals=False)
    assert back.restore() == 3
    got = back.extra
    assert isinstance(got["module_state"], OrderedDict) and got["module_state"]._metadata == sd._metadata
    for key in ("w", "tied", "also_tied"):
        assert torch.equal(got["module_state"][key], sd[key].contiguous())
    assert got["module_state"]["tied"] is got["module_state"]["also_tied"]  # stored once
    for key in ("bf16", "scalar", "empty", "bool", "long"):
        assert got[key].dtype == extra[key].dtype and torch.equal(got[key], extra[key])
    assert got["np"].dtype == np.int16 and np.array_equal(got["np"], extra["np"])
    assert got["np_scalar"] == np.float32(1.25) and isinstance(got["np_scalar"], np.float32)
    assert got["py"] == extra["py"] and got["torch_types"] == extra["torch_types"]
    assert isinstance(got["torch_types"][2], torch.Size)


def test_scheduler_and_grad_scaler_state_round_trip(tmp_path: Path) -> None:
    model, opt, sched = small_setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    for _ in range(5):
        loss = model(torch.randn(4, 8)).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    scaler.update(new_scale=256.0)
    Checkpointer(model=model, optimizer=opt, scheduler=sched, scaler=scaler, root=tmp_path, handle_signals=False).save(
        5
    )

    model2, opt2, sched2 = small_setup(seed=1)
    scaler2 = torch.amp.GradScaler("cpu")
    ck = Checkpointer(
        model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2, root=tmp_path, handle_signals=False
    )
    assert ck.restore() == 5
    assert scaler2.state_dict() == scaler.state_dict() and scaler2.get_scale() == 256.0
    assert sched2.state_dict() == sched.state_dict() and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert state_hash(model2) == state_hash(model)
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p1][key], opt2.state[p2][key])


def test_unsupported_values_fail_at_save_time_naming_the_key(tmp_path: Path) -> None:
    ck = Checkpointer(root=tmp_path, handle_signals=False)
    ck.extra["cfg"] = {"when": time.gmtime()}
    with pytest.raises(TypeError, match=r"state\['state'\]\['cfg'\]\['when'\]"):
        ck.save(1)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    [path] = saved(tmp_path / "ck", [1])
    (path / "state.pkl").write_bytes(pickle.dumps({"version": 1, "state": Evil()}))
    (path / MANIFEST_NAME).unlink()  # re-commit it with matching checksums: verification passes
    files = {
        p.name: (p.stat().st_size, __import__("hashlib").sha256(p.read_bytes()).hexdigest()) for p in path.iterdir()
    }
    ckpt.write_manifest(path, 1, files)
    assert verify_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        Checkpointer(root=tmp_path / "ck", handle_signals=False).restore()
    assert not (tmp_path / "pwned").exists()


def test_state_hash_sees_every_bit() -> None:
    model, _, _ = small_setup()
    h = state_hash(model)
    assert h == state_hash(model.state_dict()) and len(h) == 64
    with torch.no_grad():
        w = model[0].weight
        w.view(-1).view(torch.int32)[3] ^= 1  # one bit of one float
    assert state_hash(model) != h


# --- exact resume in-process (fast) ----------------------------------------------------------


def _loader(n: int = 20, batch: int = 3, workers: int = 0, sampler: bool = False) -> DataLoader:
    ds = TensorDataset(torch.arange(n))
    g = torch.Generator().manual_seed(5)
    if sampler:
        return DataLoader(ds, batch_size=batch, sampler=ResumableSampler(ds, seed=11), generator=g, num_workers=workers)
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=g, num_workers=workers)


def _take(data: ResumableLoader, count: int) -> list[list[int]]:
    out: list[list[int]] = []
    while len(out) < count:
        for (batch,) in data:
            out.append(batch.tolist())
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("sampler", [False, True], ids=["shuffle-replay", "resumable-sampler"])
def test_the_data_position_resumes_at_every_batch_including_epoch_ends(sampler: bool) -> None:
    total = 3 * 7  # 3 epochs of 7 batches (20 samples, batch 3)
    expected = _take(ResumableLoader(_loader(sampler=sampler)), total)
    assert sorted(sum(expected[:7], [])) == list(range(20)) and expected[:7] != expected[7:14]
    for cut in range(total + 1):
        first = ResumableLoader(_loader(sampler=sampler))
        head = _take(first, cut)
        state = first.state_dict()
        resumed = ResumableLoader(_loader(sampler=sampler))
        resumed.load_state_dict(state)
        assert head + _take(resumed, total - cut) == expected, f"cut at {cut}"


def test_the_data_position_resumes_with_worker_processes() -> None:
    expected = _take(ResumableLoader(_loader(workers=2)), 10)
    first = ResumableLoader(_loader(workers=2))
    head = _take(first, 4)
    resumed = ResumableLoader(_loader(workers=2))
    resumed.load_state_dict(first.state_dict())
    assert head + _take(resumed, 6) == expected


def test_loaders_that_cannot_resume_exactly_are_refused() -> None:
    ds = TensorDataset(torch.arange(10))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(ValueError, match="map-style"):
        ResumableLoader(DataLoader(Stream()))
    with pytest.raises(TypeError, match="ResumableLoader"):
        Checkpointer(loader=DataLoader(ds, generator=torch.Generator()), handle_signals=False)


def _run(root: Path, steps: int, stop_at: int | None = None) -> str:
    model, opt, sched = small_setup()
    data = ResumableLoader(
        DataLoader(
            TensorDataset(torch.randn(40, 8)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )
    )
    ck = Checkpointer(
        model=model, optimizer=opt, scheduler=sched, loader=data, root=root, total_steps=steps, handle_signals=False
    )
    step = ck.restore()
    while step < steps:
        for (x,) in data:
            noise = random.random() + float(np.random.rand())  # Python and numpy RNGs matter too
            loss = model(x + noise).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == stop_at:
                ckpt.request_save()
            if ck.step(step) or step == steps:
                break
        if ck.preempting():
            break
    ck.close()
    return state_hash(model)


def test_resume_in_process_is_bitwise_exact(tmp_path: Path) -> None:
    random.seed(0)
    np.random.seed(0)
    expected = _run(tmp_path / "a", 25)
    random.seed(0)
    np.random.seed(0)
    _run(tmp_path / "b", 25, stop_at=10)  # epoch end (10 batches an epoch)
    assert latest_checkpoint(tmp_path / "b").name == step_dirname(10)
    ckpt._clear_requests()
    random.seed(123)  # the checkpoint restores them
    np.random.seed(123)
    _run(tmp_path / "b", 25, stop_at=17)
    ckpt._clear_requests()
    assert _run(tmp_path / "b", 25) == expected


# --- preemption, progress, background saves ---------------------------------------------------


def test_sigterm_and_request_save_make_the_next_step_save_synchronously(tmp_path: Path) -> None:
    model, opt, _ = small_setup()
    ck = Checkpointer(model=model, optimizer=opt, root=tmp_path, every_steps=100)
    try:
        assert not ck.step(1) and not ck.preempting()
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
        assert ck.preempting() and ckpt.preempting()
        assert ck.step(2) is True
        assert latest_checkpoint(tmp_path).name == step_dirname(2)  # already committed: synchronous
        assert ck.step(2) is True and len(list(tmp_path.iterdir())) == 1
    finally:
        ck.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    ckpt._clear_requests()
    ck = Checkpointer(model=model, root=tmp_path / "r", handle_signals=False)
    ckpt.request_save(stop=False)
    assert ck.step(3) is False and latest_checkpoint(tmp_path / "r").name == step_dirname(3)
    assert not ck.step(4) and latest_checkpoint(tmp_path / "r").name == step_dirname(3)


def test_the_notice_file_means_preempting_unless_it_is_left_over(tmp_path: Path, monkeypatch) -> None:
    notice = tmp_path / "notice.json"
    monkeypatch.setenv("SPOTRUN_NOTICE_FILE", str(notice))
    assert not ckpt.preempting() and ckpt.seconds_left() is None
    notice.write_text(json.dumps({"deadline": time.time() - 600, "seconds_left": 0}))
    old = time.time() - 3600
    os.utime(notice, (old, old))  # an earlier attempt's notice: past deadline, written before we started
    ckpt._clear_requests()
    assert not ckpt.preempting()
    notice.write_text(json.dumps({"deadline": time.time() + 90, "seconds_left": 90}))
    ckpt._clear_requests()
    assert ckpt.preempting()
    assert 85 < ckpt.seconds_left() <= 90


def test_progress_file_is_rewritten_atomically_and_rarely(tmp_path: Path, monkeypatch) -> None:
    progress = tmp_path / "progress.json"
    monkeypatch.setenv("SPOTRUN_PROGRESS_FILE", str(progress))
    ck = Checkpointer(root=tmp_path / "ck", total_steps=50, handle_signals=False)
    for s in range(1, 11):
        ck.step(s)
    report = json.loads(progress.read_text())
    assert report["step"] == 1 and report["total"] == 50 and abs(report["at"] - time.time()) < 60  # 1/s at most
    ck.step(50)  # the last step is always reported (and saved)
    assert json.loads(progress.read_text())["step"] == 50
    assert latest_checkpoint(tmp_path / "ck").name == step_dirname(50)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("progress")] == ["progress.json"]


def _hold_the_disk(monkeypatch, timeout: float) -> threading.Event:
    """Hold every checkpoint write until the returned event is set (or `timeout` passes)."""
    gate = threading.Event()
    real_write = checkpoint_io.write_snapshot

    def held_disk(*args, **kwargs):
        gate.wait(timeout)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "write_snapshot", held_disk)
    return gate


def test_interval_saves_run_in_the_background_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    gate = _hold_the_disk(monkeypatch, timeout=10)
    ck = Checkpointer(model=torch.nn.Linear(64, 64), root=tmp_path, every_steps=2, keep=None, handle_signals=False)
    ck.step(1)
    t = time.perf_counter()
    ck.step(2)  # due: staged, handed to the background
    for s in (3, 4, 5):  # due again at 4, but one save is in flight: training goes on, no wait
        assert ck.step(s) is False
    assert time.perf_counter() - t < 2 and complete_checkpoints(tmp_path) == []
    gate.set()
    ck.wait()
    ck.step(6)
    ck.wait()
    assert [p.name for p in complete_checkpoints(tmp_path)] == [step_dirname(2), step_dirname(6)]

    ck2 = Checkpointer(root=tmp_path / "t", every_seconds=1e-6, handle_signals=False)
    ck2.step(1)
    ck2.wait()
    assert latest_checkpoint(tmp_path / "t").name == step_dirname(1)


def test_a_background_save_stalls_only_for_the_copy_and_saves_the_state_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """A periodic save returns once the state is copied to memory, before anything is written (how
    long that copy takes is measured by `make bench`, not here: timed tests flake on shared
    machines); training that moves on meanwhile does not leak into the checkpoint."""
    gate = _hold_the_disk(monkeypatch, timeout=30)
    model = torch.nn.Linear(512, 300)
    saved = state_hash(model)
    ck = Checkpointer(model=model, root=tmp_path, keep=1, handle_signals=False)
    ck.save(1, sync=False)  # returns although the disk is held
    assert complete_checkpoints(tmp_path) == [] and ck._busy()
    with torch.no_grad():
        model.weight.add_(1.0)  # the next training steps
    gate.set()
    ck.wait()
    back = torch.nn.Linear(512, 300)
    assert Checkpointer(model=back, root=tmp_path, handle_signals=False).restore() == 1
    assert state_hash(back) == saved != state_hash(model)


def test_a_failed_background_save_is_raised_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    ck = Checkpointer(model=torch.nn.Linear(4, 4), root=tmp_path, handle_signals=False)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "write_snapshot", broken)
    ck.save(1, sync=False)
    with pytest.raises(CheckpointError, match="No space left"):
        ck.wait()
    assert list(tmp_path.iterdir()) == []


def test_sigkill_during_a_background_save_never_leaves_a_loadable_torn_checkpoint(tmp_path: Path) -> None:
    rng = random.Random()
    torn_seen, trials = 0, 0
    while not torn_seen and trials < 4:  # usually one trial: the child is mid-write ~90% of the time
        trials += 1
        root = tmp_path / f"t{trials}"
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "helpers_train.py"), "saver", str(root), "48"],
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(root),
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("SAVING") and int(line.split()[1]) >= 3:
                break
        time.sleep(rng.uniform(0, 0.15))
        proc.kill()
        proc.wait()
        torn_seen += bool(list(root.glob(TMP_PREFIX + "*")))
        step_dirs = sorted(p for p in root.iterdir() if not p.name.startswith("."))
        assert step_dirs and all(verify_checkpoint(p) for p in step_dirs)  # only whole ones have step names
        model = torch.nn.Linear(48 * 256, 1024, bias=False)
        ck = Checkpointer(model=model, root=root, keep=2, handle_signals=False)
        step = ck.restore()
        assert step >= 2 and bool((model.weight == step).all())
        ck.save(step + 1)  # and the dead writer's temp folder is cleaned up
        assert not list(root.glob(TMP_PREFIX + "*"))
    assert torn_seen, "the kill never landed mid-save: the test did not test anything"


# --- extra state, completion, one-pass restore, live and background writes ----------------------


class _Metric:
    def __init__(self) -> None:
        self.values: list[float] = []

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = list(state["values"])


def test_state_takes_objects_with_state_dicts_and_plain_values(tmp_path: Path) -> None:
    model, _, _ = small_setup()
    ema, metric = torch.nn.Linear(8, 2), _Metric()
    metric.values = [0.5, 0.25]
    ck = Checkpointer(
        model=model, root=tmp_path, state={"ema": ema, "metric": metric, "best": 1.5}, handle_signals=False
    )
    ck.state["best"] = 0.75
    ck.save(3)
    expected = state_hash(ema)

    ema2, metric2 = torch.nn.Linear(8, 2), _Metric()
    back = Checkpointer(
        model=model, root=tmp_path, state={"ema": ema2, "metric": metric2, "best": 9.0}, handle_signals=False
    )
    assert back.restore() == 3
    assert state_hash(ema2) == expected and metric2.values == [0.5, 0.25] and back.state["best"] == 0.75
    assert back.state["ema"] is ema2  # objects are loaded in place, not replaced

    with pytest.raises(CheckpointError, match=r"no state for \['extra_thing'\]"):
        Checkpointer(root=tmp_path, state={"extra_thing": 1}, handle_signals=False).restore()
    with pytest.raises(TypeError, match=r"state\['cfg'\].*struct_time"):
        Checkpointer(root=tmp_path, state={"cfg": time.gmtime()}, handle_signals=False)

    class SaveOnly:
        def state_dict(self) -> dict:
            return {}

    with pytest.raises(TypeError, match="no load_state_dict"):
        Checkpointer(root=tmp_path, state={"half": SaveOnly()}, handle_signals=False)


def test_a_notice_at_the_last_step_does_not_stop_the_run(tmp_path: Path) -> None:
    model, _, _ = small_setup()
    ck = Checkpointer(model=model, root=tmp_path, total_steps=5, every_steps=100)
    try:
        ck.step(4)
        os.kill(os.getpid(), signal.SIGTERM)
        assert ck.preempting()
        assert ck.step(5) is False  # finished: write the outputs, exit 0
        assert latest_checkpoint(tmp_path).name == step_dirname(5)
    finally:
        ck.close()


def test_restore_reads_every_byte_once_and_checks_it_as_it_reads(tmp_path: Path, monkeypatch) -> None:
    model = torch.nn.Linear(1024, 1024)  # 4 MiB: one shard
    ck = Checkpointer(model=model, root=tmp_path, keep=None, handle_signals=False)
    ck.save(1)
    with torch.no_grad():
        model.weight.add_(1)
    ck.save(2)
    good = state_hash(model)

    read, hashed = [0], []
    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        read[0] += n
        return n

    monkeypatch.setattr(os, "preadv", counting_preadv)
    monkeypatch.setattr(
        ckpt, "verify_checkpoint", lambda p, deep=True: hashed.append(deep) or verify_checkpoint(p, deep=deep)
    )
    fresh = torch.nn.Linear(1024, 1024)
    assert Checkpointer(model=fresh, root=tmp_path, handle_signals=False).restore() == 2
    shards = sum(f.stat().st_size for f in (tmp_path / step_dirname(2)).glob("tensors-*.bin"))
    assert read[0] == shards and state_hash(fresh) == good and True not in hashed  # one pass, no separate hashing

    shard = tmp_path / step_dirname(2) / "tensors-0000.bin"
    with open(shard, "r+b") as f:  # flip one bit: same size, so only the hash can tell
        f.seek(12345)
        byte = f.read(1)[0]
        f.seek(12345)
        f.write(bytes([byte ^ 0x10]))
    older = torch.nn.Linear(1024, 1024)
    assert Checkpointer(model=older, root=tmp_path, handle_signals=False).restore() == 1  # fell back
    assert not torch.equal(older.weight, fresh.weight)


def test_a_synchronous_save_writes_from_the_live_tensors_without_a_staging_buffer(tmp_path: Path) -> None:
    model = torch.nn.Linear(300, 301)  # odd sizes: partial pages, padding between tensors
    ck = Checkpointer(model=model, root=tmp_path, handle_signals=False)
    ck.save(1, sync=True)
    assert ck._stager is None  # nothing allocated: a first (preemption) save costs what any other does
    ck.save(2, sync=False)
    ck.wait()
    live, staged = (tmp_path / step_dirname(1)), (tmp_path / step_dirname(2))
    for name in ("tensors-0000.bin",):
        assert (live / name).read_bytes() == (staged / name).read_bytes()
    back = torch.nn.Linear(300, 301)
    Checkpointer(model=back, root=tmp_path, handle_signals=False).restore()
    assert state_hash(back) == state_hash(model)


def test_background_writers_run_at_a_lower_priority(tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[str, int]] = []
    real = checkpoint_io._write_shard

    def spy(path, snap, start, end, *rest):
        seen.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real(path, snap, start, end, *rest)

    monkeypatch.setattr(checkpoint_io, "_write_shard", spy)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ck = Checkpointer(model=torch.nn.Linear(64, 64), root=tmp_path, handle_signals=False)
    ck.save(1, sync=True)
    ck.save(2, sync=False)
    ck.wait()
    assert [nice for _, nice in seen] == [base, max(base, min(19, base + checkpoint_io.BACKGROUND_NICE))]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller is untouched


def test_writes_fall_back_to_buffered_io_where_o_direct_is_refused(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no tmpfs at /dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        model = torch.nn.Linear(200, 300)
        Checkpointer(model=model, root=root, handle_signals=False).save(1)
        back = torch.nn.Linear(200, 300)
        assert Checkpointer(model=back, root=root, handle_signals=False).restore() == 1
        assert state_hash(back) == state_hash(model)
    finally:
        shutil.rmtree(root, ignore_errors=True)


class _Augmented(torch.utils.data.Dataset):
    """Each fetch adds noise from the fetching process's torch RNG (a worker's, or the global one)."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(float(i)) + torch.rand(())


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, True)], ids=["main-process", "persistent-workers"])
def test_an_epoch_left_part_way_and_a_checkpoint_both_resume_exactly(workers: int, persistent: bool) -> None:
    def loader() -> ResumableLoader:
        torch.manual_seed(3)
        return ResumableLoader(
            DataLoader(_Augmented(), batch_size=4, shuffle=True, num_workers=workers, persistent_workers=persistent)
        )

    def take(data: ResumableLoader, count: int, out: list) -> None:
        while count:
            for batch in data:
                out.append(batch.tolist())
                torch.rand(())  # training draws from the global RNG between batches
                count -= 1
                if not count:
                    break

    expected: list = []
    take(loader(), 15, expected)  # 6 batches an epoch: crosses two epoch ends
    got: list = []
    first = loader()
    take(first, 4, got)
    take(first, 3, got)  # iterated again after leaving the epoch part-way, in the same process
    rng = torch.get_rng_state()
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    torch.set_rng_state(rng)  # the Checkpointer restores the global RNG with the position
    take(resumed, 8, got)
    assert got == expected


def test_restore_reads_into_the_live_tensors_and_still_checks_every_byte(tmp_path: Path) -> None:
    """Saved tensors with a live twin (same place in the tree, dtype and shape) are read straight into
    it: no new memory, nothing for load_state_dict to copy. The rest (here: a state value that is
    not a state_dict object) get their own storage. A flipped byte deep in a big shard is still
    caught while reading, and restore falls back."""
    torch.manual_seed(3)
    model = torch.nn.Linear(700, 701)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 700)).sum().backward()
    opt.step()
    state = {"big": torch.randn(3 << 18), "odd": torch.randn(1001).double(), "flags": torch.rand(77) > 0.5}
    ck = Checkpointer(model=model, optimizer=opt, root=tmp_path, state={"tensors": state}, handle_signals=False)
    ck.save(1)
    ck.save(2)
    model2 = torch.nn.Linear(700, 701)
    opt2 = torch.optim.AdamW(model2.parameters())
    model2(torch.randn(4, 700)).sum().backward()
    opt2.step()  # the optimizer has its moments already (a restore in the same process)
    weight, moment = model2.weight.data_ptr(), opt2.state_dict()["state"][0]["exp_avg"].data_ptr()
    back = Checkpointer(model=model2, optimizer=opt2, root=tmp_path, state={"tensors": None}, handle_signals=False)
    assert back.restore() == 2
    assert state_hash(model2) == state_hash(model)
    got = back.state["tensors"]
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in state.items())
    assert got["odd"].untyped_storage().nbytes() == 1001 * 8  # its own storage
    restored = opt2.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(restored, opt.state_dict()["state"][0]["exp_avg"])
    assert model2.weight.data_ptr() == weight and restored.data_ptr() == moment  # read in place
    fresh = torch.optim.AdamW(torch.nn.Linear(700, 701).parameters())  # no moments yet: they get memory
    assert Checkpointer(optimizer=fresh, root=tmp_path, state={"tensors": None}, handle_signals=False).restore() == 2
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    shard = tmp_path / step_dirname(2) / "tensors-0000.bin"
    with open(shard, "r+b") as f:
        f.seek(2 << 20)
        byte = f.read(1)
        f.seek(2 << 20)
        f.write(bytes([byte[0] ^ 1]))
    again = Checkpointer(model=model2, root=tmp_path, state={"tensors": None}, handle_signals=False)
    assert again.restore() == 1 and again.restored_from == tmp_path / step_dirname(1)
    assert state_hash(model2) == state_hash(model)  # step 1's weights equal step 2's here: whole again


def test_format_1_checkpoints_with_sha256_still_load_and_are_still_checked(tmp_path: Path) -> None:
    """Checkpoints written before the CRC manifest (format 1: one sha256 per file) restore, and a
    flipped byte in one is still caught while reading."""
    import hashlib

    model = torch.nn.Linear(600, 500)
    Checkpointer(model=model, root=tmp_path, handle_signals=False).save(3)
    path = tmp_path / step_dirname(3)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["format"] = 1
    manifest["files"] = {
        rel: {"size": e["size"], "sha256": hashlib.sha256((path / rel).read_bytes()).hexdigest()}
        for rel, e in manifest["files"].items()
    }
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert verify_checkpoint(path)
    back = torch.nn.Linear(600, 500)
    assert Checkpointer(model=back, root=tmp_path, handle_signals=False).restore() == 3
    assert state_hash(back) == state_hash(model)
    with open(path / "tensors-0000.bin", "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0x80]))
    assert not verify_checkpoint(path)
    with pytest.raises(CheckpointError, match="corrupt"):  # caught, though read into the model on the way
        Checkpointer(model=torch.nn.Linear(600, 500), root=tmp_path, handle_signals=False).restore()


def test_chunk_crc_digest_does_not_depend_on_how_the_bytes_are_fed(tmp_path: Path) -> None:
    from spotrun.checkpoint.format import ChunkCRC, crc_file, read_manifest, write_manifest

    data = random.Random(5).randbytes(2 * CRC_CHUNK + 12345)
    whole = ChunkCRC()
    whole.update(data)
    pieces, pos, rng = ChunkCRC(), 0, random.Random(6)
    while pos < len(data):
        n = rng.choice([1, 4095, 1 << 20, CRC_CHUNK - 7, 3 * CRC_CHUNK])
        pieces.update(memoryview(data)[pos : pos + n])
        pos += n
    (tmp_path / "f").write_bytes(data)
    assert whole.hexdigest() == pieces.hexdigest() == crc_file(tmp_path / "f")
    assert len(whole.hexdigest()) == len("crc32:") + 3 * 8 and ChunkCRC().hexdigest() == "crc32:"
    folder = tmp_path / step_dirname(1)
    folder.mkdir()
    (folder / "f").write_bytes(data)
    write_manifest(folder, 1, {"f": (len(data), whole.hexdigest())})
    assert read_manifest(folder)["format"] == 2 and verify_checkpoint(folder)
    m = json.loads((folder / MANIFEST_NAME).read_text())
    m["files"]["f"]["crc32"] = m["files"]["f"]["crc32"][:-8]  # a chunk's digest missing: malformed
    (folder / MANIFEST_NAME).write_text(json.dumps(m))
    assert read_manifest(folder) is None and not verify_checkpoint(folder)


def test_read_state_reads_into_live_tensors_only_where_they_match_and_share_no_memory(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved_state = {"a": torch.randn(2000), "b": torch.randn(1500), "c": torch.randn(10, 10), "d": torch.randn(7)}
    Checkpointer(root=tmp_path, state={"t": saved_state}, handle_signals=False).save(1)
    path = tmp_path / step_dirname(1)
    manifest = ckpt.read_manifest(path)

    flat = torch.zeros(3500)
    apart = {"a": flat[:2000], "b": flat[2000:], "c": torch.zeros(100), "d": torch.zeros(7).double()}
    got = checkpoint_io.read_state(path, manifest, into={"state": {"t": apart}})["state"]["t"]
    assert all(torch.equal(got[k], v) for k, v in saved_state.items())
    assert got["a"].data_ptr() == flat.data_ptr() and torch.equal(flat[2000:], saved_state["b"])  # read in place
    assert got["c"].data_ptr() != apart["c"].data_ptr() and not apart["c"].any()  # other shape: its own memory
    assert got["d"].dtype == torch.float32 and not apart["d"].any()  # other dtype: its own memory

    flat = torch.zeros(3500)
    overlapping = {"a": flat[:2000], "b": flat[1000:2500]}
    got = checkpoint_io.read_state(path, manifest, into={"state": {"t": overlapping}})["state"]["t"]
    assert all(torch.equal(got[k], v) for k, v in saved_state.items())
    assert not flat.any()  # neither was written in place: their bytes would have clashed
