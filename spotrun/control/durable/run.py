"""The durable controller's entry point: `python -m spotrun.control.durable JOB [--store URL]`.

With `--store`, the job may be unknown here (another machine launched it, or this is a fresh
controller host): its rows are rebuilt from the store's record, unless this database already
holds a newer view (more events). Then the ordinary controller runs it: the lease decides whether
this one drives it, and the existing resume path (write-ahead attempts, idempotent launches,
`list_owned`) adopts the running instance instead of starting a second one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spotrun.clouds.store import StoreError, open_store
from spotrun.control.durable.record import last_event_id, parse, read_record
from spotrun.control.durable.state import DurableState

EXIT_BAD_INPUT = 2


def sync_from_store(state: DurableState, job_id: str, store_url: str) -> bool:
    """Bring this database's copy of the job up to the store's record. False: no record there."""
    record = read_record(open_store(store_url), job_id)
    if record is None:
        return False
    job, attempts, events = parse(record)
    try:
        state.job(job_id)
        local_last = last_event_id(state.events(job_id))
    except KeyError:
        local_last = -1
    if last_event_id(events) >= local_last:
        state.replace_job(job, attempts, events)
    return True


def main(argv: list[str] | None = None) -> int:
    from spotrun.control.controller import Controller, ControllerBusy

    args = list(argv if argv is not None else sys.argv[1:])
    store_url = None
    if "--store" in args:
        at = args.index("--store")
        store_url = args[at + 1] if at + 1 < len(args) else ""
        del args[at : at + 2]
    if len(args) != 1 or store_url == "":
        print("usage: python -m spotrun.control.durable JOB_ID [--store URL]", file=sys.stderr)
        return EXIT_BAD_INPUT
    job_id = args[0]
    state = DurableState.open_default()
    try:
        if store_url is not None and not sync_from_store(state, job_id, store_url):
            print(f"no record of job {job_id} in {store_url}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if store_url is not None:  # another machine's job: its secret env values may not be here
            from spotrun.control.secrets import resume_refusal

            refusal = resume_refusal(state, job_id)
            if refusal is not None:
                print(refusal, file=sys.stderr)
                return EXIT_BAD_INPUT
        return Controller(state).run(job_id).exit_code
    except ControllerBusy as e:
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyError, StoreError) as e:
        print(f"cannot drive job {job_id}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def spawn(job_id: str, store_url: str | None, log: Path, python: str | None = None) -> subprocess.Popen[bytes]:
    """Start a detached durable controller for the job (it outlives the calling process), with
    `python` (the interpreter to run, where sys.executable is not how it is started), else this one."""
    command = [python or sys.executable, "-m", "spotrun.control.durable", job_id]
    if store_url:
        command += ["--store", store_url]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True
        )
