"""The job outlives the machine that launched it (issue 16).

The store holds, under `jobs/<id>/control/`, everything another machine needs to see, cancel or
take over a job:

    record.json   the job, its attempts and events as the controller last committed them
                  (written after every commit, before the controller acts: write-ahead, like
                  the SQLite database, which is now a cache of this record)
    lease.json    which controller drives the job, until when (renewed with a compare-and-swap)
    cancel        a cancel request from a machine without the job's database

`DurableState` (state.py) is the SQLite State with that mirror and the lease; `lease.py` the lease;
`record.py` the record's format; `remote.py` reading a job from only the store; `run.py` the
controller entry point that rebuilds the cache from the record and adopts the job.
"""

from __future__ import annotations

CONTROL = "control"


def control_key(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/{CONTROL}/{name}"
