"""The Agent's container path with a real OCI runtime: podman + runc and a busybox image made
offline (`scripts/install_podman.sh` installs them). Env, mounts, SIGTERM forwarding on a
notice, checkpoint upload and resume, exit codes. Skipped, with the reason, where no runtime
can run a container."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from spotrun.agent import jobfile
from spotrun.agent.jobfile import AgentJob
from spotrun.agent.main import EXIT_PREEMPTED, Agent
from spotrun.agent.workload import AgentPaths, ContainerWorkload
from spotrun.bundle import pack_dir, pack_path
from spotrun.clouds.base import Boot
from spotrun.clouds.store import LocalStore

PREFIX = "jobs/c1"
IMAGE = "localhost/spotrun-test-busybox:latest"
# the sandbox recipe from DESIGN.md: runc (crun fails here), cgroupfs, explicit ulimits
CLI = "podman --runtime runc --cgroup-manager=cgroupfs"
RUN_ARGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "none"]

# A training stand-in in plain sh: resumes, counts, saves a checkpoint (the on-disk format,
# sha256sum for the manifest) at the first step after SIGTERM, leaves a result on success.
TRAIN_SH = r"""
echo "job=$SPOTRUN_JOB_ID attempt=$SPOTRUN_ATTEMPT ckpt=$SPOTRUN_CHECKPOINT_DIR data=$SPOTRUN_DATA_DIR"
echo "pwd=$(pwd) secret=$MY_SECRET"
echo "data says: $(cat "$SPOTRUN_DATA_DIR/file.txt")"
save() {
  d="$SPOTRUN_CHECKPOINT_DIR/.tmp-$1"; mkdir -p "$d"; echo "$1" > "$d/state"
  sum=$(sha256sum "$d/state" | cut -d' ' -f1); size=$(($(wc -c < "$d/state")))
  printf '{"format": 1, "step": %d, "created": 0, "files": {"state": {"size": %d, "sha256": "%s"}}}' \
    "$1" "$size" "$sum" > "$d/MANIFEST.json"
  mv "$d" "$SPOTRUN_CHECKPOINT_DIR/$(printf %012d "$1")"
}
start=0
for d in "$SPOTRUN_CHECKPOINT_DIR"/[0-9]*; do [ -f "$d/MANIFEST.json" ] && start=$(cat "$d/state"); done
echo "resumes at $start"
term=0
trap 'term=1' TERM
i=$start
while [ "$i" -lt "$TOTAL" ]; do
  i=$((i + 1)); echo "step $i"
  printf '{"step": %d, "total": %d, "at": 0}' "$i" "$TOTAL" > "$SPOTRUN_PROGRESS_FILE"
  if [ "$term" = 1 ]; then
    save "$i"; echo "saved step $i, notice: $(cat "$SPOTRUN_NOTICE_FILE")"; exit 0
  fi
  sleep 0.05
done
echo "done at $i" > "$SPOTRUN_OUTPUT_DIR/result.txt"
exit "${EXIT_CODE:-0}"
"""


def _skip_unless_runtime() -> None:
    missing = [b for b in ("podman", "runc", "busybox") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"no container runtime here: {', '.join(missing)} missing (run scripts/install_podman.sh)")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox image imported offline from a rootfs tarball."""
    _skip_unless_runtime()
    rootfs = tmp_path_factory.mktemp("rootfs")
    for folder in ("bin", "proc", "sys", "dev", "tmp", "etc", "work", "data", "output", "spotrun", "checkpoints"):
        (rootfs / folder).mkdir()
    busybox = Path(shutil.which("busybox") or "/bin/busybox").resolve()
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    tar_path = rootfs.parent / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for child in sorted(rootfs.iterdir()):
            tar.add(child, arcname=child.name)
    cli = CLI.split()
    imported = subprocess.run([*cli, "import", str(tar_path), IMAGE], capture_output=True, text=True)
    if imported.returncode != 0:
        pytest.skip(f"podman cannot import an image here: {imported.stderr.strip()[-300:]}")
    smoke = subprocess.run([*cli, "run", "--rm", *RUN_ARGS, IMAGE, "echo", "ok"], capture_output=True, text=True)
    if smoke.returncode != 0 or smoke.stdout.strip() != "ok":
        pytest.skip(f"podman cannot run a container here: {smoke.stderr.strip()[-300:]}")
    return IMAGE


def setup_job(tmp_path: Path, image: str, *, total: int, env: dict[str, str]) -> LocalStore:
    store = LocalStore(tmp_path / "store")
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "train.sh").write_text(TRAIN_SH)
    bundle = pack_dir(work)
    (tmp_path / "file.txt").write_text("hello from the store\n")
    data = pack_path(tmp_path / "file.txt")
    store.put_file(f"{PREFIX}/bundle/{bundle.sha256}.tar.gz", bundle.path)
    store.put_file(f"{PREFIX}/data/{data.sha256}.tar.gz", data.path)
    job = AgentJob(
        job_id="c1", name="ctr", image=image, container_cli=CLI, container_args=RUN_ARGS,
        setup="echo setup in $(pwd) > /output/setup.txt", run="sh train.sh",
        bundle=f"{PREFIX}/bundle/{bundle.sha256}.tar.gz",
        data=[jobfile.DataItem(f"{PREFIX}/data/{data.sha256}.tar.gz", "file.txt")],
        env={"TOTAL": str(total), "MY_SECRET": "s3cr3t", **env},
        heartbeat_interval=0.2, log_flush_interval=0.2, upload_budget=1.0,
    )  # fmt: skip
    store.put_bytes(jobfile.job_key(PREFIX), job.to_json().encode())
    return store


def boot(store: LocalStore, notice: Path, attempt: int) -> Boot:
    return Boot("c1", attempt, store.url, PREFIX, notice={"kind": "local", "path": str(notice), "poll_interval": 0.05})


def log_of(store: LocalStore, attempt: int) -> str:
    return b"".join(store.get_bytes(k) for k in store.list(jobfile.log_prefix(PREFIX, attempt))).decode()


def exit_of(store: LocalStore, attempt: int) -> dict:
    return json.loads(store.get_bytes(jobfile.exit_key(PREFIX, attempt)))


def test_container_preempt_then_resume_then_exit_code(tmp_path: Path, image: str) -> None:
    import threading
    import time

    store = setup_job(tmp_path, image, total=1000, env={})
    notice = tmp_path / "notice.json"
    root = tmp_path / "root1"

    def announce() -> None:  # the market's notice, once the container reached step 5
        for _ in range(600):
            try:
                if json.loads((root / "meta" / "progress.json").read_text())["step"] >= 5:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        notice.write_text(json.dumps({"deadline": time.time() + 6.0}))

    threading.Thread(target=announce, daemon=True).start()
    assert Agent(boot(store, notice, 1), root, store=store).run() == EXIT_PREEMPTED
    log = log_of(store, 1)
    assert "job=c1 attempt=1 ckpt=/checkpoints data=/data" in log
    assert "pwd=/work secret=s3cr3t" in log and "data says: hello from the store" in log
    saved = int(log.split("saved step ")[1].split(",")[0])  # SIGTERM reached sh inside the container
    assert '"seconds_left"' in log
    rec = exit_of(store, 1)
    assert rec["reason"] == "preempted" and rec["checkpoint_step"] == saved
    assert rec["at"] <= json.loads(notice.read_text())["deadline"]
    _no_container_left()

    # attempt 2 resumes in a new container from the uploaded checkpoint and fails with code 3
    job = AgentJob.from_json(store.get_bytes(jobfile.job_key(PREFIX)))
    job.env.update(TOTAL=str(saved + 3), EXIT_CODE="3")
    store.put_bytes(jobfile.job_key(PREFIX), job.to_json().encode())
    assert Agent(boot(store, tmp_path / "n2.json", 2), tmp_path / "root2", store=store).run() == 3
    log2 = log_of(store, 2)
    assert f"resumes at {saved}" in log2 and f"step {saved + 1}\n" in log2 and f"step {saved + 4}" not in log2
    assert exit_of(store, 2) == {**exit_of(store, 2), "reason": "failed", "code": 3, "phase": "running"}
    assert (tmp_path / "root2" / "output" / "setup.txt").read_text() == "setup in /work\n"
    assert not store.list(jobfile.outputs_prefix(PREFIX))  # failed: outputs not uploaded

    # attempt 3 succeeds: exit 0, outputs uploaded
    job.env.update(EXIT_CODE="0")
    store.put_bytes(jobfile.job_key(PREFIX), job.to_json().encode())
    assert Agent(boot(store, tmp_path / "n3.json", 3), tmp_path / "root3", store=store).run() == 0
    assert store.get_bytes(f"{PREFIX}/outputs/result.txt") == f"done at {saved + 3}\n".encode()
    _no_container_left()


def _no_container_left() -> None:
    listed = subprocess.run(
        [*CLI.split(), "ps", "-a", "--filter", "name=spotrun-c1", "--format", "{{.Names}}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert listed.stdout.strip() == ""


def test_container_command_line_passes_env_by_name_only(tmp_path: Path) -> None:
    """What the Agent asks docker/podman to run, checked with a stand-in CLI that prints it."""
    paths = AgentPaths(tmp_path / "root")
    paths.prepare()
    echo_argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))"]
    w = ContainerWorkload(
        paths, None, "python train.py", {"TOKEN": "hunter2", "SPOTRUN_JOB_ID": "c1"},
        image="img:1", cli=echo_argv, name="spotrun-c1-a1-x", checkpoint_dir="/ckpt", extra_args=["--shm-size", "1g"],
    )  # fmt: skip
    argv = json.loads(w.output.read().decode())
    w.cleanup()
    assert "hunter2" not in " ".join(argv)
    assert argv[:6] == ["run", "--rm", "--name", "spotrun-c1-a1-x", "-w", "/work"]
    pairs = {argv[i + 1] for i, a in enumerate(argv) if a == "-v"}
    assert pairs == {
        f"{paths.work}:/work", f"{paths.checkpoints}:/ckpt", f"{paths.data}:/data",
        f"{paths.output}:/output", f"{paths.meta}:/spotrun",
    }  # fmt: skip
    assert {argv[i + 1] for i, a in enumerate(argv) if a == "-e"} == {"TOKEN", "SPOTRUN_JOB_ID"}
    assert argv[-5:] == ["--shm-size", "1g", "img:1", "sh", "/spotrun/entry.sh"]
    assert json.loads((paths.meta / "container.json").read_text())["name"] == "spotrun-c1-a1-x"
