"""ShardedCheckpointer in one process (a gloo world of 1): its manifest is format 2 (a CRC-32 per
8 MiB chunk, hashed on a few threads), a save restores bit for bit, and a torn shard is never
loaded. The multi-node path itself is tests/e2e/test_multinode_e2e.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from spotrun.checkpoint.format import MANIFEST_NAME, step_dirname, verify_checkpoint  # noqa: E402
from spotrun.checkpoint.sharded import ShardedCheckpointer, complete_for  # noqa: E402


@pytest.fixture
def world(tmp_path: Path) -> Iterator[None]:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_and_opt(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        loss = model(torch.randn(16, 64)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_sharded_save_is_format_2_and_restores_bit_for_bit(world: None, tmp_path: Path) -> None:
    root = tmp_path / "ck"
    model, opt = _model_and_opt(0)
    _train(model, opt, 3)
    ck = ShardedCheckpointer(model=model, optimizer=opt, root=root, handle_signals=False)
    ck.save(3)
    folder = root / step_dirname(3)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format"] == 2
    assert manifest["files"] and all("crc32" in e and "sha256" not in e for e in manifest["files"].values())
    assert complete_for(folder, 1) and verify_checkpoint(folder)
    after = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 2)  # moves on: the restore must bring it back
    fresh, fresh_opt = _model_and_opt(1)
    ck2 = ShardedCheckpointer(model=fresh, optimizer=fresh_opt, root=root, handle_signals=False)
    assert ck2.restore() == 3 and ck2.restored_from == folder
    assert all(torch.equal(a, b) for a, b in zip(after, fresh.parameters(), strict=True))


def test_a_torn_shard_is_never_loaded(world: None, tmp_path: Path) -> None:
    root = tmp_path / "ck"
    model, opt = _model_and_opt(0)
    ck = ShardedCheckpointer(model=model, optimizer=opt, root=root, handle_signals=False)
    ck.save(1)
    _train(model, opt, 1)
    ck.save(2)
    shard = next(p for p in (root / step_dirname(2)).iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    assert not complete_for(root / step_dirname(2), 1)
    fresh, fresh_opt = _model_and_opt(1)
    ck2 = ShardedCheckpointer(model=fresh, optimizer=fresh_opt, root=root, handle_signals=False)
    assert ck2.restore() == 1  # the older, intact one


def test_restore_rehashes_only_the_checkpoint_it_loads(
    world: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three kept checkpoints: the older two are checked by size only, the newest is re-hashed
    once; a torn newest is found by that hash and the next one is re-hashed in its place."""
    import spotrun.checkpoint.sharded as sharded

    root = tmp_path / "ck"
    model, opt = _model_and_opt(0)
    ck = ShardedCheckpointer(model=model, optimizer=opt, root=root, keep=3, handle_signals=False)
    for step in (1, 2, 3):
        _train(model, opt, 1)
        ck.save(step)
    hashed: list[str] = []
    real = sharded.verify_checkpoint

    def spy(path: Path | str, *, deep: bool = True) -> bool:
        if deep:
            hashed.append(Path(path).name)
        return real(path, deep=deep)

    monkeypatch.setattr(sharded, "verify_checkpoint", spy)
    fresh, fresh_opt = _model_and_opt(1)
    assert ShardedCheckpointer(model=fresh, optimizer=fresh_opt, root=root, handle_signals=False).restore() == 3
    assert hashed == [step_dirname(3)]

    hashed.clear()
    shard = next(p for p in (root / step_dirname(3)).iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert ShardedCheckpointer(model=fresh, optimizer=fresh_opt, root=root, handle_signals=False).restore() == 2
    assert hashed == [step_dirname(3), step_dirname(2)]
