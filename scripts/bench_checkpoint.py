"""Checkpoint benchmark: spotrun's checkpoint I/O against the disk's own speed, at real sizes.

For each state size (a model holding a third of the bytes, its AdamW moments the rest), medians
over --repeats rounds that interleave the contenders, all in one directory (one disk):

* the disk: `dd bs=8M oflag=direct conv=fsync` (one stream), the same bytes as 4 parallel
  `dd oflag=direct` streams into 4 files, and `dd bs=8M iflag=direct` reading the file back;
* the manifest's digest alone (format 2: CRC-32 per 8 MiB chunk) over the same bytes on the
  writer's threads, no disk (every byte is hashed: the CPU ceiling of a save and a restore), and
  sha256 alone, what format 1 used;
* spotrun preemption save: `save(sync=True)` from a fresh Checkpointer (the first save in a
  process: no staging buffer, written from the live tensors), until committed;
* spotrun periodic save: `save(sync=False)`: the stall (the copy to memory; the first one also
  allocates the buffer) and the background write until committed;
* spotrun restore: `restore()` into the live model and optimizer from a cold cache (pages dropped
  with posix_fadvise), checking every byte against the manifest as it reads; the same into an
  optimizer that has no moments yet (a restore in a new process allocates them); and the files
  read with no check into fresh tensors;
* the effective stall: steps/s of a CPU training loop (an MLP on one thread, the main thread, as
  in a training script) while a periodic save runs, against the same loop without one, rounds
  interleaved; "seconds lost" is the time the loop ran minus the time its steps would have taken;
* `torch.save` + fsync, what a script without spotrun would do.

    .venv/bin/python scripts/bench_checkpoint.py [--gib 0.5 2 8] [--repeats 3] [--dir .] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1 << 30
STREAMS = 4


def make_state(total_bytes: int) -> tuple[Any, Any]:
    """A model holding a third of the bytes, and AdamW with its two moments (the other two thirds)."""
    import torch

    torch.manual_seed(0)
    params = total_bytes // 4 // 3
    layer = 4096 * 4096  # 64 MiB tensors, the last one smaller
    sizes = [min(layer, params - i) for i in range(0, params, layer)]
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n) * 0.02) for n in sizes])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # allocates exp_avg and exp_avg_sq
    for p in model.parameters():
        p.grad = None
    return model, opt


def clear(path: Path) -> None:
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def drop_cache(path: Path) -> None:
    """Evict a folder's files from the page cache (clean pages: no root needed)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def dd_write(folder: Path, nbytes: int, streams: int = 1) -> float:
    """Seconds for `streams` parallel `dd oflag=direct` writing nbytes in all (scaled to nbytes)."""
    count = math.ceil(nbytes / streams / (8 << 20))
    cmds = [
        ["dd", "if=/dev/zero", f"of={folder / f'dd-{i}.bin'}", "bs=8M", f"count={count}", "oflag=direct", "conv=fsync"]
        for i in range(streams)
    ]
    started = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
    if any(p.wait() for p in procs):
        raise RuntimeError("dd failed")
    return (time.perf_counter() - started) * nbytes / (streams * count * (8 << 20))


def dd_read(path: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=8M", "iflag=direct"], check=True, capture_output=True)
    return time.perf_counter() - started


def hash_alone(nbytes: int, digest: Any) -> float:
    """Seconds to hash nbytes in shards on the writer threads (scaled from at most 1 GiB: memory)."""
    from spotrun.checkpoint.io import SHARD_BYTES, writer_threads

    blob = memoryview(bytearray(min(nbytes, GIB)))
    shards = [blob[i : i + SHARD_BYTES] for i in range(0, len(blob), SHARD_BYTES)]
    started = time.perf_counter()
    with ThreadPoolExecutor(writer_threads()) as pool:
        list(pool.map(digest, shards))
    return (time.perf_counter() - started) * nbytes / len(blob)


def sha256_of(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def crc_of(data: memoryview) -> str:
    from spotrun.checkpoint.format import ChunkCRC

    h = ChunkCRC()
    h.update(data)
    return h.hexdigest()


def torch_save(folder: Path, model: Any, opt: Any) -> float:
    import torch

    started = time.perf_counter()
    with open(folder / "plain.pt", "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


class Loop:
    """A CPU training step (MLP 1024-2048-1024, batch 64, one thread): the workload a save must not starve."""

    def __init__(self) -> None:
        import torch

        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3)
        self.x = torch.randn(64, 1024)

    def step(self) -> None:
        loss = self.net(self.x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def run_for(self, seconds: float) -> float:
        """Steps per second over `seconds`."""
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.step()
            n += 1
        return n / (time.perf_counter() - started)


def measure(nbytes: int, repeats: int, base: Path) -> dict[str, Any]:
    import torch

    from spotrun.checkpoint import Checkpointer
    from spotrun.checkpoint.format import step_dirname
    from spotrun.checkpoint.io import read_state

    torch.set_num_threads(1)  # the loop's one thread; the writers bring their own
    model, opt = make_state(nbytes)
    state_bytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    loop = Loop()
    loop.run_for(0.5)  # warm up
    keys = (
        "dd_direct dd_streams dd_read crc sha256 preempt_save restore restore_fresh read_unchecked "
        "periodic_stall_first periodic_stall "
        "periodic_write loop_base loop_during lost torch_save"
    ).split()
    t: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(repeats):
        t["dd_direct"].append(dd_write(base, state_bytes))
        t["dd_read"].append(dd_read(base / "dd-0.bin") * state_bytes / (base / "dd-0.bin").stat().st_size)
        clear(base)
        t["dd_streams"].append(dd_write(base, state_bytes, STREAMS))
        clear(base)
        t["crc"].append(hash_alone(state_bytes, crc_of))
        t["sha256"].append(hash_alone(state_bytes, sha256_of))

        root = base / "ck"
        ck = Checkpointer(model=model, optimizer=opt, root=root, keep=1, handle_signals=False)
        t["preempt_save"].append(timed(ck.save, 10 * r + 1))
        ck.close()
        drop_cache(root)
        ck = Checkpointer(model=model, optimizer=opt, root=root, keep=1, handle_signals=False)
        t["restore"].append(timed(ck.restore))
        ck.close()
        drop_cache(root)
        fresh = torch.optim.AdamW(model.parameters(), lr=1e-4)  # no moments yet, as in a new process
        ck = Checkpointer(model=model, optimizer=fresh, root=root, keep=1, handle_signals=False)
        t["restore_fresh"].append(timed(ck.restore))
        ck.close()
        del ck, fresh
        drop_cache(root)
        t["read_unchecked"].append(timed(read_state, root / step_dirname(10 * r + 1)))  # no manifest: no hashing
        clear(base)

        ck = Checkpointer(model=model, optimizer=opt, root=root, keep=1, handle_signals=False)
        t["periodic_stall_first"].append(timed(ck.save, 10 * r + 2, sync=False))  # allocates the buffer
        ck.wait()
        before = loop.run_for(2.0)
        started = time.perf_counter()
        ck.save(10 * r + 3, sync=False)
        stall = time.perf_counter() - started
        steps = 0
        while ck._busy():  # the training loop runs while the save is written
            loop.step()
            steps += 1
        ck.wait()
        elapsed = time.perf_counter() - started
        after = loop.run_for(2.0)
        base_rate = (before + after) / 2
        t["periodic_stall"].append(stall)
        t["periodic_write"].append(elapsed - stall)
        t["loop_base"].append(base_rate)
        t["loop_during"].append(steps / (elapsed - stall))  # while the background write runs
        t["lost"].append(elapsed - steps / base_rate)
        ck.close()
        clear(base)

        t["torch_save"].append(torch_save(base, model, opt))
        clear(base)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {"bytes": state_bytes, "seconds": med, "samples": t}


def run(gibs: list[float], repeats: list[int], directory: str | Path, interval: float = 600.0) -> dict[str, Any]:
    from spotrun.checkpoint.io import writer_threads

    base = Path(tempfile.mkdtemp(prefix=".spotrun-bench-", dir=directory))
    load_before = os.getloadavg()[0]
    try:
        counts = repeats if len(repeats) == len(gibs) else [repeats[0]] * len(gibs)
        sizes = {str(g): measure(int(g * GIB), n, base) for g, n in zip(gibs, counts)}  # noqa: B905
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return {
        "sizes": sizes,
        "repeats": counts,
        "writer_threads": writer_threads(),
        "directory": str(Path(directory).resolve()),
        "load_average": [load_before, os.getloadavg()[0]],
        "interval": interval,
    }


def markdown(r: dict[str, Any], command: str) -> str:
    gibs = list(r["sizes"])
    cols = " | ".join(f"{g} GiB" for g in gibs)

    def row(label: str, fn: Any) -> str:
        return f"| {label} | " + " | ".join(fn(r["sizes"][g]) for g in gibs) + " |"

    def gbs(key: str) -> Any:
        return lambda s: f"{s['bytes'] / s['seconds'][key] / 1e9:.2f} GB/s ({s['seconds'][key]:.2f} s)"

    def ratio(key: str, ref: str) -> Any:
        return lambda s: f"{s['seconds'][ref] / s['seconds'][key]:.2f}×"

    def secs(key: str) -> Any:
        return lambda s: f"{s['seconds'][key]:.3f} s"

    def slowdown(s: dict) -> str:
        return f"{100 * (1 - s['seconds']['loop_during'] / s['seconds']['loop_base']):.1f}%"

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = [
        "## Checkpoint I/O",
        "",
        f"`{command}` — medians of {'/'.join(map(str, r['repeats']))} interleaved rounds (per size), in "
        f"`{r['directory']}`; "
        f"spotrun writes and reads with {r['writer_threads']} threads; load average (1 min) "
        + "; ".join(f"{a:.1f} before, {b:.1f} after" for a, b in r["loads"])
        + " (a shared 2-core machine: other jobs' CPU use lowers every CPU-bound line).",
        "",
        f"| | {cols} |",
        "|---|" + "---:|" * len(gibs),
        row("disk write: `dd bs=8M oflag=direct`, one stream", gbs("dd_direct")),
        row(f"disk write: {STREAMS} parallel `dd oflag=direct` streams", gbs("dd_streams")),
        row("disk read: `dd bs=8M iflag=direct`", gbs("dd_read")),
        row("manifest digest alone (CRC-32 per 8 MiB), no disk: the CPU ceiling", gbs("crc")),
        row("sha256 alone, no disk (format 1's digest, for comparison)", gbs("sha256")),
        row("spotrun preemption save (`save(sync=True)`, first in process)", gbs("preempt_save")),
        row("… vs one-stream direct write", ratio("preempt_save", "dd_direct")),
        row("spotrun periodic save, background write", gbs("periodic_write")),
        row("… vs one-stream direct write", ratio("periodic_write", "dd_direct")),
        row(
            "spotrun restore (cold cache, every byte checked while reading, into the live model and optimizer)",
            gbs("restore"),
        ),
        row("… vs direct read", ratio("restore", "dd_read")),
        row(
            "spotrun restore into an optimizer with no moments yet (a new process: 2/3 of the state allocated)",
            gbs("restore_fresh"),
        ),
        row("… vs direct read", ratio("restore_fresh", "dd_read")),
        row(
            "`read_state` with no manifest and no live tensors (no check; every tensor allocated)",
            gbs("read_unchecked"),
        ),
        row("… vs direct read", ratio("read_unchecked", "dd_read")),
        row("`torch.save` + fsync", gbs("torch_save")),
        row("periodic save: training stall, first save (allocates the buffer)", secs("periodic_stall_first")),
        row("periodic save: training stall, later saves", secs("periodic_stall")),
        row(
            "training loop steps/s without a save → during one",
            lambda s: f"{s['seconds']['loop_base']:.1f} → {s['seconds']['loop_during']:.1f}",
        ),
        row("effective slowdown while a periodic save is written", slowdown),
        row("seconds of training lost per periodic save (stall included)", secs("lost")),
        row(
            "→ shortest save interval keeping that under 5% of training time",
            lambda s: f"{max(0.0, s['seconds']['lost']) / 0.05:.0f} s",
        ),
        "",
    ]
    big = [g for g in gibs if float(g) >= 2]
    if big:
        save_ratio = min(r["sizes"][g]["seconds"]["dd_direct"] / r["sizes"][g]["seconds"]["preempt_save"] for g in big)
        bg_ratio = min(r["sizes"][g]["seconds"]["dd_direct"] / r["sizes"][g]["seconds"]["periodic_write"] for g in big)
        lines.append(
            f"Targets at {', '.join(big)} GiB: save ≥ 0.8× direct write — preemption save {save_ratio:.2f}×, "
            f"background write {bg_ratio:.2f}× ({verdict(min(save_ratio, bg_ratio) >= 0.8)})."
        )
    judged = [r["sizes"][g] for g in (big or gibs)]  # the sizes (2 and 8 GiB) when measured
    read_ratio = min(s["seconds"]["dd_read"] / s["seconds"]["restore"] for s in judged)
    fresh_ratio = min(s["seconds"]["dd_read"] / s["seconds"].get("restore_fresh", math.inf) for s in judged)
    worst = max(1 - s["seconds"]["loop_during"] / s["seconds"]["loop_base"] for s in r["sizes"].values())
    lost = max(s["seconds"]["lost"] for s in r["sizes"].values())
    lines += [
        f"Restore ≥ 0.8× direct read at {', '.join(big or gibs)} GiB: {read_ratio:.2f}× at worst "
        f"({verdict(read_ratio >= 0.8)}); into an optimizer "
        f"that must first allocate its moments (a new process), {fresh_ratio:.2f}× at worst. "
        f"Effective stall of a periodic save ≤ 5% of the step-time budget between saves: a save costs the "
        f"training loop {lost:.2f} s at worst (stall plus the loop's slowdown while it is written), "
        f"{100 * max(0.0, lost) / r['interval']:.1f}% of {r['interval']:.0f} s of training "
        f"({verdict(max(0.0, lost) <= 0.05 * r['interval'])}); saves at least {max(0.0, lost) / 0.05:.0f} s apart "
        f"keep it ≤ 5%. While the write runs the loop is {100 * worst:.1f}% slower at worst.",
        "",
        "Every byte a save writes is hashed for the manifest (CRC-32 per 8 MiB chunk, manifest format 2, "
        "which restore and the Agent check) and every byte a restore reads is hashed again; where the "
        "digest line is slower than the disk, the CPU, not the I/O path, bounds the save.",
        "",
    ]
    return "\n".join(lines)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' sizes in one result, with each run's load averages."""
    out = dict(runs[0])
    out["sizes"] = {g: s for r in runs for g, s in r["sizes"].items()}
    out["repeats"] = [n for r in runs for n in r["repeats"]]
    out["loads"] = [r["load_average"] for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="checkpoint I/O vs the disk (dd direct, parallel streams), stall")
    p.add_argument("--gib", type=float, nargs="+", default=[0.5, 2.0], help="state sizes in GiB")
    p.add_argument("--repeats", type=int, nargs="+", default=[3], help="rounds: one count, or one per size")
    p.add_argument("--dir", default=".", help="where to write (the disk under test); cleaned up after")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--render", nargs="+", metavar="JSON", help="render runs saved with --json as one table")
    p.add_argument("--interval", type=float, default=600.0, help="periodic save interval (s) for the stall budget")
    args = p.parse_args(argv)
    if args.render:  # runs saved with --json (e.g. the big size alone, when memory allowed): one table
        runs = [json.loads(Path(f).read_text()) for f in args.render]
        result = merge(runs)
        command = "` then `".join(r["command"] for r in runs)
        print(markdown(result, command))
        return 0
    result = run(args.gib, args.repeats, args.dir, args.interval)
    command = "python scripts/bench_checkpoint.py " + " ".join(
        ["--gib", *(f"{g:g}" for g in args.gib), "--repeats", *map(str, args.repeats)]
    )
    result["command"] = command
    result["loads"] = [result["load_average"]]
    print(json.dumps(result, indent=1) if args.json else markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
