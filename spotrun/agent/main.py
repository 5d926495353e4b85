"""The Agent: what runs on every instance (and as each local-provider "instance").

    fetch job.json, code bundle, data, newest valid checkpoint      phase "fetching"
    run setup, then run (process group, or container)                phase "setup", "running"
    meanwhile: logs, heartbeats, new checkpoints -> Store; watch the preemption notice
    notice: notice file, SIGTERM, wait (notice - upload budget),     phase "checkpointing"
            SIGKILL if needed, upload newest checkpoint              phase "uploading"
    end:    final checkpoint, outputs (on success), logs, `exit` record

The exit record `attempts/<n>/exit` is written once: {"code", "reason", "at", "checkpoint_step"}
(+ "phase" and "error" when they say something), reason one of "completed", "failed",
"preempted", "terminated" (the Agent itself got SIGTERM/SIGINT) or "agent-error".
Timing decisions use the injected clock; the background threads tick in real time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from spotrun.agent import jobfile
from spotrun.agent.fetch import AgentFailure, fetch_bundle, place_data
from spotrun.agent.gang import Gang, GangUploader
from spotrun.agent.jobfile import AgentJob
from spotrun.agent.notice import NoticeWatcher, make_watcher
from spotrun.agent.sync import (
    CheckpointUploader,
    LogShipper,
    Periodic,
    heartbeat,
    restore_latest,
    upload_outputs,
)
from spotrun.agent.workload import (
    CTR_DATA,
    CTR_META,
    CTR_OUTPUT,
    DEFAULT_GPU_WAIT,
    GPU_WAIT_ENV,
    GPUS_ENV,
    AgentPaths,
    ContainerWorkload,
    GpuWaitFailed,
    ProcessWorkload,
    Workload,
    container_cli,
    container_name,
    count_gpus,
    ensure_cdi_spec,
    ensure_image,
    wait_for_gpus,
)
from spotrun.clock import SYSTEM_CLOCK, Clock
from spotrun.clouds.base import BOOT_MARKER, Boot, extract_boot
from spotrun.clouds.store import Store, StoreError, open_store

DEFAULT_ROOT = "/var/lib/spotrun"
EXIT_PREEMPTED = 75  # the Agent's own exit code after a notice (the record has the details)
EXIT_AGENT_ERROR = 70  # the Agent could not run the job (store, bundle, image...)
_AGENT_ONLY_ENV = ("SPOTRUN_BOOT_B64", "SPOTRUN_AGENT_ROOT")


class NoticeReceived(Exception):
    """A preemption notice arrived before the workload started."""

    def __init__(self, seconds_left: float, reason: str) -> None:
        super().__init__(f"{reason}: {seconds_left:.0f}s left")
        self.seconds_left, self.reason = seconds_left, reason


@dataclass
class Outcome:
    code: int | None
    reason: str
    error: str = ""
    phase: str = ""  # for a failure: "setup" or "running"
    kind: str = ""  # for an agent-error: "store", "bundle", "data", "image" or "agent"


def _shell_code(code: int | None) -> int | None:
    """Popen's -N (killed by signal N) as a shell would report it: 128+N."""
    return 128 - code if code is not None and code < 0 else code


class Agent:
    def __init__(
        self,
        boot: Boot,
        root: str | Path,
        *,
        store: Store | None = None,
        clock: Clock = SYSTEM_CLOCK,
        watcher: NoticeWatcher | None = None,
        tick: float = 0.05,
        terminate_grace: float = 10.0,
        echo: IO[bytes] | None = None,
    ) -> None:
        self.boot = boot
        self.paths = AgentPaths(Path(root).resolve())
        for key, value in boot.env.items():  # e.g. the storage account the store lives in
            os.environ.setdefault(key, value)
        self.store = store or open_store(boot.store_url)
        self.clock = clock
        self.watcher = watcher if watcher is not None else make_watcher(boot.notice)
        self.tick = tick
        self.terminate_grace = terminate_grace  # the window given when the Agent itself is SIGTERMed
        self.prefix = boot.job_prefix
        self.phase = "fetching"
        self.job: AgentJob | None = None
        self.restored_step: int | None = None
        self._secrets: dict[str, str] = {}  # `${VAR}` values read from the cloud's secret store
        self._terminated = threading.Event()
        self._terminated_reason: str | None = None  # "preempted" or "terminated", once asked
        self._next_notice_check = 0.0
        self._periodic: list[Periodic] = []
        # a multi-node job: node r>0 keeps its own log, heartbeat and exit record (spotrun/agent/gang.py)
        self.gang = Gang.from_env(self.store, self.prefix, boot.job_id, boot.attempt, boot.env)
        self.own_prefix = self.gang.own_prefix if self.gang else self.prefix
        self.log = LogShipper(self.store, self.own_prefix, boot.attempt, echo=echo)
        if self.gang is not None:
            self.uploader: CheckpointUploader = GangUploader(
                self.gang, self.store, self.prefix, self.paths.checkpoints, note=self.log.note
            )
        else:
            self.uploader = CheckpointUploader(self.store, self.prefix, self.paths.checkpoints, note=self.log.note)

    # ----------------------------------------------------------------- entry points

    def request_stop(self) -> None:
        """Called from the SIGTERM/SIGINT handler: act as on a short preemption notice."""
        self._terminated.set()

    def run(self) -> int:
        """Run the whole attempt; returns the process exit code."""
        self.log.note(f"agent started: job {self.boot.job_id}, attempt {self.boot.attempt}")
        try:
            # Inside the try: a read-only or full store is an agent-error with a record, never a crash.
            self._start_heartbeats(interval=5.0)
            self.paths.prepare()
            try:
                job_bytes = self.store.get_bytes(jobfile.job_key(self.prefix))
            except (StoreError, OSError) as e:
                raise AgentFailure("store", f"reading job.json from {self.store.url} failed: {e}") from e
            self.job = AgentJob.from_json(job_bytes)
            self._restart_heartbeats()
            self._read_secrets()
            self.uploader.keep = max(1, self.job.keep)
            self.uploader.interval = min(1.0, self.job.heartbeat_interval)
            self._fetch()
            self._wait_for_gpus()
            workload = self._start()
        except NoticeReceived as notice:
            self.log.note(f"{notice}: nothing started, nothing to save")
            return self._finish(Outcome(None, notice.reason), EXIT_PREEMPTED)
        except Exception as e:
            return self._agent_error(e)
        try:
            return self._watch(workload)
        except Exception as e:  # never leave the workload running behind a broken Agent
            workload.cleanup()
            return self._agent_error(e, _shell_code(workload.exit_code()))

    # ----------------------------------------------------------------- phases

    def _fetch(self) -> None:
        job = self.job
        assert job is not None
        if job.bundle:
            fetch_bundle(self.store, job.bundle, self.paths.work, self.paths.tmp)
            self.log.note(f"code bundle {job.bundle.rsplit('/', 1)[-1]} unpacked")
        self._check_notice()
        for item in job.data:
            place_data(self.store, item, self._data_host_path(job, item.target), self.paths.tmp)
            self.log.note(f"data {item.source} -> {item.target}")
            self._check_notice()
        self.restored_step = restore_latest(self.store, self.prefix, self.paths.checkpoints, self.log.note)
        self.uploader.uploaded_step = self.restored_step
        if self.restored_step is None:
            self.log.note("no checkpoint in the store: starting from scratch")
        else:
            self.log.note(f"restored checkpoint {self.restored_step}")
        self._check_notice()

    def _expected_gpus(self) -> int:
        """The offer's GPU count (SPOTRUN_GPUS, set by the controller for cloud launches); 0: none
        expected (a CPU offer, the local provider)."""
        try:
            return max(0, int(self.boot.env.get(GPUS_ENV) or os.environ.get(GPUS_ENV) or 0))
        except ValueError:
            return 0

    def _wait_for_gpus(self) -> None:
        """Wait (bounded) until the driver shows the offer's GPUs; else the attempt is a boot
        failure (kind "boot"): a workload must never train on the CPU because the driver is missing."""
        expected = self._expected_gpus()
        if not expected:
            return
        env = {**os.environ, **self.boot.env}
        self.phase = "gpu-wait"  # what the heartbeats (and `spotrun status`) say meanwhile
        try:
            timeout = float(env.get(GPU_WAIT_ENV) or DEFAULT_GPU_WAIT)
        except ValueError:
            timeout = DEFAULT_GPU_WAIT
        try:
            seen = wait_for_gpus(
                expected, timeout=timeout, now=self.clock.now, sleep=self.clock.sleep,
                probe=lambda: count_gpus(env), note=self.log.note, stop=self._check_notice,
            )  # fmt: skip
        except GpuWaitFailed as e:
            raise AgentFailure("boot", str(e)) from e
        self.log.note(f"GPUs ready: {seen}")

    def _read_secrets(self) -> None:
        """`${VAR}` values from the cloud's secret store (spotrun/agent/secrets.py): memory only."""
        from spotrun.agent.secrets import fetch_secrets

        assert self.job is not None
        self._secrets = fetch_secrets(self.boot.env, list(self.job.secret_env))
        if self._secrets:
            self.log.note(f"secret env read from the cloud's secret store: {', '.join(sorted(self._secrets))}")

    def _data_host_path(self, job: AgentJob, target: str) -> Path:
        """Where a data entry goes on this machine. A relative target lives under the data
        folder; an absolute one is that path itself, or (in a container) a folder mounted there."""
        if not target.startswith("/"):
            return self.paths.data / target
        if job.image:
            return self.paths.mounts / target.strip("/").replace("/", "__")
        return Path(target)

    def _env(self, in_container: bool) -> dict[str, str]:
        job = self.job
        assert job is not None
        p = self.paths
        if in_container:
            env = {k: os.environ[k] for k in job.secret_env if k in os.environ}
            dirs = (job.checkpoint_dir, CTR_DATA, CTR_OUTPUT, f"{CTR_META}/notice.json", f"{CTR_META}/progress.json")
        else:
            env = {k: v for k, v in os.environ.items() if k not in _AGENT_ONLY_ENV}
            env.update(self.boot.env)
            dirs = (str(p.checkpoints), str(p.data), str(p.output), str(p.notice_file), str(p.progress_file))
        env.setdefault("PYTHONUNBUFFERED", "1")  # logs arrive as they are printed
        env.update(job.env)
        env.update(self._secrets)
        names = ("CHECKPOINT_DIR", "DATA_DIR", "OUTPUT_DIR", "NOTICE_FILE", "PROGRESS_FILE")
        env.update({f"SPOTRUN_{n}": v for n, v in zip(names, dirs)})  # noqa: B905 (3.9 on VMs)
        env["SPOTRUN_JOB_ID"] = self.boot.job_id
        env["SPOTRUN_ATTEMPT"] = str(self.boot.attempt)
        return env

    def _start(self) -> Workload:
        job = self.job
        assert job is not None
        run, gang_env = job.run, {}
        if self.gang is not None:  # node 0's rendezvous address, through the store
            endpoint = self.gang.endpoint(self._check_notice, self.clock.sleep)
            self.log.note(f"gang node {self.gang.rank}/{self.gang.nodes}: rendezvous at {endpoint}")
            gang_env = self.gang.env(endpoint, in_container=bool(job.image))
            run = self.gang.command(run)
        if not job.image:
            self.phase = "setup" if job.setup else "running"
            return ProcessWorkload(self.paths, job.setup, run, {**self._env(False), **gang_env})
        cli = container_cli(job.container_cli, {**os.environ, **self.boot.env})
        gpus = self._expected_gpus() or None
        try:
            done = ensure_cdi_spec(cli) if gpus else None
        except Exception as e:
            raise AgentFailure("boot", f"GPUs for the container: {e}") from e
        if done:
            self.log.note(done)
        try:
            ensure_image(cli, job.image)
        except Exception as e:
            raise AgentFailure("image", f"image {job.image}: {type(e).__name__}: {e}") from e
        self._check_notice()
        extra = list(job.container_args)
        if self.gang is not None:
            extra = self.gang.container_args(extra) + extra
        for item in job.data:
            if item.target.startswith("/"):
                extra += ["-v", f"{self._data_host_path(job, item.target)}:{item.target}"]
        self.phase = "setup" if job.setup else "running"
        self.log.note(f"starting container {job.image} with {' '.join(cli)}")
        return ContainerWorkload(
            self.paths, job.setup, run, {**self._env(True), **gang_env},
            image=job.image, cli=cli, name=container_name(self.boot.job_id, self.boot.attempt),
            checkpoint_dir=job.checkpoint_dir, extra_args=extra, gpus=gpus,
        )  # fmt: skip

    def _watch(self, workload: Workload) -> int:
        self.log.start_reader(workload.output)
        self.uploader.start()
        self._next_notice_check = 0.0  # a notice that came while starting is seen at once
        while True:
            # The exit first: a workload that already finished when a notice arrives has completed
            # (treating it as preempted would lose its outputs and run it again elsewhere).
            code = workload.exit_code()
            if code is not None:
                told = self.gang.read_notice(interval=0.0) if self.gang is not None and code != 0 else None
                if told is not None:  # the gang stopped on another node's notice: not a failure
                    return self._preempted(workload, *told)
                return self._completed(workload, _shell_code(code))
            left = self._poll_notice()
            if left is not None:
                return self._preempted(workload, *left)
            self._follow_phase()
            self.clock.sleep(self.tick)

    def _preempted(self, workload: Workload, seconds_left: float, reason: str) -> int:
        assert self.job is not None
        if self.gang is not None:
            self._post_gang_notice(seconds_left, reason)  # first: the other nodes save the same step
        start = self.clock.now()
        # Keep the upload budget, but never more than half a short notice: a workload with no time
        # to save at all would lose the work since its last periodic checkpoint.
        budget = min(self.job.upload_budget, seconds_left / 2)
        deadline = start + max(0.0, seconds_left - budget)
        notice = {"deadline": deadline, "seconds_left": deadline - start, "instance_deadline": start + seconds_left}
        tmp = self.paths.notice_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(notice))
        os.replace(tmp, self.paths.notice_file)
        self.phase = "checkpointing"
        self.log.note(
            f"{reason} notice: {seconds_left:.1f}s left; SIGTERM to the workload, "
            f"{deadline - start:.1f}s to save (upload budget {budget:g}s)"
        )
        if self.gang is None:  # a gang's ranks see the notice file and stop together (torchrun would
            workload.terminate()  # forward a second SIGTERM, which kills a rank mid-save)
        while workload.alive() and self.clock.now() < deadline:
            self.clock.sleep(self.tick)
        if workload.alive():
            self.log.note("the workload is still running at its deadline: SIGKILL")
            workload.kill()
        code = _shell_code(workload.exit_code())
        workload.cleanup()
        self.log.join_reader(timeout=2.0)
        self.phase = "uploading"
        self.uploader.stop(abort_current=True)
        self._final_checkpoint()
        self._finish(Outcome(code, reason), EXIT_PREEMPTED)
        if self.watcher is not None:
            self.watcher.acknowledge()
        return EXIT_PREEMPTED

    def _completed(self, workload: Workload, code: int | None) -> int:
        assert self.job is not None
        ended_in = self._read_phase()
        self.phase = "uploading"
        workload.cleanup()  # stray background processes, the container
        if not self.log.join_reader(timeout=5.0):
            self.log.note("something outside the workload still holds its output open")
        self.uploader.stop()
        self._final_checkpoint()
        error = self.log.last_error() if code else ""
        outcome = Outcome(code, "completed" if code == 0 else "failed", error, phase=ended_in)
        if code != 0 and self._terminated.is_set():
            # The OS's shutdown (GCE's ACPI stop on a preemption) signalled the workload as well as
            # the Agent: it did not fail, it was stopped; its last checkpoint is uploaded above.
            reason = self._stop_reason()
            self.log.note(f"the workload ended with code {code} in the OS shutdown ({reason})")
            self._finish(Outcome(code, reason), EXIT_PREEMPTED)
            if reason == "preempted" and self.watcher is not None:
                self.watcher.acknowledge()
            return EXIT_PREEMPTED
        if code == 0:
            try:
                count = upload_outputs(self.store, self.prefix, self.paths.output)
                self.log.note(f"{count} output file(s) uploaded")
            except Exception as e:
                # The job's results are lost if this is called a success: report an agent error.
                self.log.note(f"output upload failed: {type(e).__name__}: {e}")
                return self._finish(
                    Outcome(EXIT_AGENT_ERROR, "agent-error", f"output upload failed: {e}"), EXIT_AGENT_ERROR
                )
        else:
            self.log.note(f"the workload failed with exit code {code} during {ended_in}")
        return self._finish(outcome, code if code is not None else EXIT_AGENT_ERROR)

    # ----------------------------------------------------------------- helpers

    def _agent_error(self, error: BaseException, code: int | None = None) -> int:
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, AgentFailure):
            kind, text = error.kind, str(error)
        elif isinstance(error, (StoreError, OSError)):
            kind, text = "store", f"store {self.store.url}: {text}"  # the heartbeat, a log flush...
        else:
            kind = "agent"
        self.log.note(f"agent error ({kind}): {text}")
        return self._finish(Outcome(code, "agent-error", text, kind=kind), EXIT_AGENT_ERROR)

    def _final_checkpoint(self) -> None:
        try:
            self.uploader.sync_once(final=True)
        except Exception as e:
            self.log.note(f"final checkpoint upload failed: {type(e).__name__}: {e}")

    def _post_gang_notice(self, seconds_left: float, reason: str) -> None:
        assert self.gang is not None
        try:
            self.gang.post_notice(seconds_left, reason)
        except Exception as e:  # the other nodes still get their own notice or lose their peer
            self.log.note(f"could not tell the other nodes: {type(e).__name__}: {e}")

    def _poll_notice(self) -> tuple[float, str] | None:
        if self.gang is not None:
            try:
                told = self.gang.read_notice()
            except Exception as e:  # a flaky store is not a notice
                self.log.note(f"gang notice check failed: {type(e).__name__}: {e}")
                told = None
            if told is not None:
                return told
        if self._terminated.is_set():
            return self.terminate_grace, self._stop_reason()
        if self.watcher is None:
            return None
        now = self.clock.now()
        if now < self._next_notice_check:
            return None
        self._next_notice_check = now + self.watcher.poll_interval
        try:
            left = self.watcher.check()
        except Exception as e:  # a flaky metadata endpoint is not a notice
            self.log.note(f"notice check failed: {type(e).__name__}: {e}")
            return None
        return None if left is None else (left, "preempted")

    def _stop_reason(self) -> str:
        """Why the OS stopped the Agent: GCE preempts with an ACPI shutdown at the same moment its
        metadata says `preempted`, so a SIGTERM with a pending notice is a preemption (asked once)."""
        if self._terminated_reason is None:
            self._terminated_reason = "terminated"
            try:
                if self.watcher is not None and self.watcher.check() is not None:
                    self._terminated_reason = "preempted"
            except Exception as e:  # noqa: BLE001 -- no answer: a plain termination
                self.log.note(f"notice check failed: {type(e).__name__}: {e}")
        return self._terminated_reason

    def _check_notice(self) -> None:
        self._next_notice_check = 0.0
        left = self._poll_notice()
        if left is not None:
            raise NoticeReceived(*left)

    def _read_phase(self) -> str:
        try:
            return self.paths.phase_file.read_text().strip() or self.phase
        except OSError:
            return self.phase

    def _follow_phase(self) -> None:
        if self.phase in ("setup", "running"):
            self.phase = self._read_phase()

    def _beat(self) -> None:
        body = heartbeat(self.phase, self.paths.progress_file, self.uploader.uploaded_step, self.clock)
        self.store.put_bytes(jobfile.heartbeat_key(self.own_prefix, self.boot.attempt), body)

    def _start_heartbeats(self, interval: float, log_interval: float = 2.0) -> None:
        self._beat()
        self._periodic = [
            Periodic("spotrun-heartbeat", interval, self._beat, self._quiet).start(),
            Periodic("spotrun-log-flush", log_interval, self.log.flush, self._quiet).start(),
        ]

    def _restart_heartbeats(self) -> None:
        assert self.job is not None
        for p in self._periodic:
            p.stop()
        self._start_heartbeats(self.job.heartbeat_interval, self.job.log_flush_interval)

    def _quiet(self, message: str) -> None:
        print(f"[spotrun-agent] {message}", file=sys.stderr, flush=True)

    def _finish(self, outcome: Outcome, exit_code: int) -> int:
        for p in self._periodic:
            p.stop()
        step = self.uploader.uploaded_step
        record: dict[str, object] = {
            "code": outcome.code,
            "reason": outcome.reason,
            "at": self.clock.now(),
            "checkpoint_step": step,
        }
        if outcome.error:
            record["error"] = outcome.error[:2000]
        if outcome.kind:
            record["kind"] = outcome.kind
        if outcome.reason == "failed":
            record["phase"] = outcome.phase
        self.log.note(f"exit: {outcome.reason} (code {outcome.code}), checkpoint {step}")
        try:
            self._beat()
        except Exception as e:
            self._quiet(f"last heartbeat failed: {e}")
        try:
            self.log.flush(final=True)
        except Exception as e:
            self._quiet(f"last log flush failed: {e}")
        key = jobfile.exit_key(self.own_prefix, self.boot.attempt)
        for attempt in range(3):  # the one record the controller must get: retry a flaky store
            try:
                if not self.store.put_bytes(key, json.dumps(record).encode(), if_absent=True):
                    self._quiet(f"{key} already exists: not overwritten")
                break
            except Exception as e:
                self._quiet(f"writing {key} failed: {type(e).__name__}: {e}")
                if attempt < 2:
                    self.clock.sleep(1.0 + attempt)
        return exit_code


# --------------------------------------------------------------------------- command line


def load_boot(text: str) -> Boot:
    """A boot record given as JSON, as base64 (SPOTRUN_BOOT_B64) or inside a bootstrap script."""
    text = text.strip()
    if text.startswith("{"):
        return Boot(**json.loads(text))
    if BOOT_MARKER in text:
        return extract_boot(text)
    return Boot.from_b64(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotrun.agent", description="The spotrun instance agent.")
    parser.add_argument("--boot-file", help="boot record (JSON, base64 or bootstrap script); default $SPOTRUN_BOOT_B64")
    parser.add_argument("--root", help=f"working folder; default $SPOTRUN_AGENT_ROOT or {DEFAULT_ROOT}")
    args = parser.parse_args(argv)
    if args.boot_file:
        text = Path(args.boot_file).read_text()
    elif os.environ.get("SPOTRUN_BOOT_B64"):
        text = os.environ["SPOTRUN_BOOT_B64"]
    else:
        parser.error("no boot record: set SPOTRUN_BOOT_B64 or pass --boot-file")
    root = args.root or os.environ.get("SPOTRUN_AGENT_ROOT") or DEFAULT_ROOT
    grace = float(os.environ.get("SPOTRUN_TERMINATE_GRACE", "10"))
    agent = Agent(load_boot(text), root, echo=sys.stdout.buffer, terminate_grace=grace)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop())
    return agent.run()
