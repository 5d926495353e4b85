"""Checkpoint benchmark: how close spotrun's checkpoint writes come to the disk's own speed, and
how long a periodic save stops training compared with a plain synchronous torch.save.

All figures come from one run, on one directory (one disk), medians over --repeats rounds that
interleave the contenders:

* `dd if=/dev/zero of=F bs=8M count=N conv=fsync` for the same number of bytes: the disk's speed;
* spotrun `Checkpointer.save(sync=True)`: staging copy + sharded write + fsync + manifest + commit;
* spotrun periodic save: `save(sync=False)` returns after the copy to memory (the stall), the rest
  runs in the background (its write phase is timed until `wait()` returns);
* `torch.save(state, f)` + fsync: what a script without spotrun stalls for.

The state is a model of --mb/3 MB plus its AdamW moments (--mb MB in all).

    .venv/bin/python scripts/bench_checkpoint.py [--mb 384] [--repeats 5] [--dir .] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_state(total_mb: int) -> tuple[Any, Any]:
    """A model holding a third of the bytes, and AdamW with its two moments (the other two thirds)."""
    import torch

    torch.manual_seed(0)
    params = total_mb * 1024 * 1024 // 4 // 3
    layer = 4096 * 4096  # 64 MiB tensors, the last one smaller
    sizes = [min(layer, params - i) for i in range(0, params, layer)]
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(n) * 0.02) for n in sizes])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # allocates exp_avg and exp_avg_sq
    return model, opt


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def clear(path: Path) -> None:
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    os.sync()


def time_dd(folder: Path, nbytes: int) -> float:
    count = math.ceil(nbytes / (8 << 20))
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={folder / 'dd.bin'}", "bs=8M", f"count={count}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    return (time.perf_counter() - started) * nbytes / (count * (8 << 20))  # scaled to the same size


def time_torch_save(folder: Path, model: Any, opt: Any) -> tuple[float, int]:
    import torch

    path = folder / "plain.pt"
    started = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started, path.stat().st_size


def time_hash(nbytes: int) -> float:
    """sha256 over the same number of bytes, in shards on as many threads as the writer uses:
    the CPU floor under spotrun's write (the manifest needs every file's sha256)."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from spotrun.checkpoint.io import SHARD_BYTES, writer_threads

    blob = memoryview(bytearray(nbytes))
    shards = [blob[i : i + SHARD_BYTES] for i in range(0, nbytes, SHARD_BYTES)]
    started = time.perf_counter()
    with ThreadPoolExecutor(writer_threads()) as pool:
        list(pool.map(lambda b: hashlib.sha256(b).hexdigest(), shards))
    return time.perf_counter() - started


def run(mb: int = 384, repeats: int = 5, directory: str | Path = ".") -> dict[str, Any]:
    """Measure; return the figures (seconds, MB/s, ratios) as a dict."""
    from spotrun.checkpoint import Checkpointer
    from spotrun.checkpoint.io import writer_threads

    model, opt = make_state(mb)
    base = Path(tempfile.mkdtemp(prefix=".spotrun-bench-", dir=directory))
    keys = ("dd", "sync_save", "stall", "background", "torch_save", "sha256")
    times: dict[str, list[float]] = {k: [] for k in keys}
    try:
        ck_root = base / "ck"
        ck = Checkpointer(model=model, optimizer=opt, root=ck_root, keep=1, handle_signals=False)
        ck.save(0)  # warm up: the staging buffer is allocated once and reused
        nbytes = dir_bytes(ck_root)
        clear(base)
        torch_bytes = 0
        for r in range(repeats):
            step = 2 * r + 1
            times["dd"].append(time_dd(base, nbytes))
            clear(base)

            seconds, torch_bytes = time_torch_save(base, model, opt)
            times["torch_save"].append(seconds)
            clear(base)

            started = time.perf_counter()
            ck.save(step, sync=True)
            times["sync_save"].append(time.perf_counter() - started)
            clear(base)

            started = time.perf_counter()
            ck.save(step + 1, sync=False)
            stall = time.perf_counter() - started
            ck.wait()
            times["stall"].append(stall)
            times["background"].append(time.perf_counter() - started - stall)
            clear(base)

            times["sha256"].append(time_hash(nbytes))
        ck.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}

    def rate(seconds: float, size: int = nbytes) -> float:
        return size / seconds / 1e6

    return {
        "state_mb": nbytes / 1e6,
        "torch_save_mb": torch_bytes / 1e6,
        "repeats": repeats,
        "writer_threads": writer_threads(),
        "load_average": os.getloadavg()[0],
        "directory": str(Path(directory).resolve()),
        "seconds": med,
        "samples": times,
        "mb_per_s": {
            "dd": rate(med["dd"]),
            "sync_save": rate(med["sync_save"]),
            "background_write": rate(med["background"]),
            "torch_save": rate(med["torch_save"], torch_bytes),
            "sha256": rate(med["sha256"]),
        },
        "throughput_vs_dd": {
            "sync_save": med["dd"] / med["sync_save"],
            "background_write": med["dd"] / med["background"],
            "torch_save": rate(med["torch_save"], torch_bytes) / rate(med["dd"]),
        },
        "stall_vs_torch_save": med["stall"] / med["torch_save"],
    }


def markdown(r: dict[str, Any]) -> str:
    s, mbs, vs = r["seconds"], r["mb_per_s"], r["throughput_vs_dd"]
    return "\n".join(
        [
            "## Checkpoint save",
            "",
            f"State: {r['state_mb']:.0f} MB (a model and its AdamW moments), in `{r['directory']}`; "
            f"medians of {r['repeats']} interleaved rounds.",
            "",
            "| writer | seconds | MB/s | vs dd |",
            "|---|---:|---:|---:|",
            f"| `dd bs=8M conv=fsync` (the disk) | {s['dd']:.3f} | {mbs['dd']:.0f} | 1.00 |",
            f"| spotrun save, synchronous (copy + write + fsync + commit) | {s['sync_save']:.3f} "
            f"| {mbs['sync_save']:.0f} | {vs['sync_save']:.2f} |",
            f"| spotrun periodic save, background part (write + fsync + commit) | {s['background']:.3f} "
            f"| {mbs['background_write']:.0f} | {vs['background_write']:.2f} |",
            f"| `torch.save` + fsync | {s['torch_save']:.3f} | {mbs['torch_save']:.0f} | {vs['torch_save']:.2f} |",
            f"| sha256 alone, {r['writer_threads']} threads, no disk (the manifest's CPU cost) | {s['sha256']:.3f} "
            f"| {mbs['sha256']:.0f} | {s['dd'] / s['sha256']:.2f} |",
            "",
            f"spotrun writes shards on {r['writer_threads']} threads, hashing each chunk as it goes and starting "
            "its writeback at once, so a save takes about the longer of the disk's time and sha256's; "
            f"load average when done: {r['load_average']:.1f}.",
            "",
            "| training stall per periodic save | seconds | vs torch.save |",
            "|---|---:|---:|",
            f"| `torch.save` + fsync, synchronous | {s['torch_save']:.3f} | 1.00 |",
            f"| spotrun `save(sync=False)` (copy to memory) | {s['stall']:.3f} | {r['stall_vs_torch_save']:.3f} |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="checkpoint save throughput vs dd, and training stall vs torch.save")
    p.add_argument("--mb", type=int, default=384, help="state size in MB (model + AdamW moments)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=".", help="where to write (the disk under test); cleaned up after")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = p.parse_args(argv)
    result = run(args.mb, args.repeats, args.dir)
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
