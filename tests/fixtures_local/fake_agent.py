"""A stand-in Agent for the local provider's tests: no Store, no torch, just the process contract.

Started by the hypervisor (`LocalProvider(agent_command=[python, this file])`) in the instance's
sandbox, with the boot record in SPOTRUN_BOOT_B64. Its behaviour comes from the boot env:

    FAKE_EXIT=<n>       exit with code n after FAKE_RUN seconds (default: run until killed)
    FAKE_RUN=<s>        seconds to run before exiting (with FAKE_EXIT)
    FAKE_CHILDREN=1     start a child in its own process group and one in its own session,
                        which must die with the instance all the same
    FAKE_ON_NOTICE=exit exit 0 as soon as the notice appears (an Agent that saved in time);
                        default: note it and keep running (the kill must come anyway)

It appends JSON lines to <sandbox>/events.jsonl (next to its root folder, which the hypervisor
deletes when the instance ends): start (pids), notice (seconds left), exit.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from spotrun.clouds.base import Boot


def log(event: str, **data: object) -> None:
    with open(Path(os.environ["SPOTRUN_AGENT_ROOT"]).parent / "events.jsonl", "a") as f:
        f.write(json.dumps({"event": event, "at": time.time(), **data}) + "\n")


def main() -> int:
    boot = Boot.from_b64(os.environ["SPOTRUN_BOOT_B64"])
    env = boot.env
    children = []
    if env.get("FAKE_CHILDREN"):
        sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
        children.append(subprocess.Popen(sleeper, process_group=0).pid)
        children.append(subprocess.Popen(sleeper, start_new_session=True).pid)
    log(
        "start",
        pid=os.getpid(),
        pgid=os.getpgid(0),
        children=children,
        boot=boot.notice,
        agent_root=os.environ.get("SPOTRUN_AGENT_ROOT"),
        cwd=os.getcwd(),
    )
    notice_path = Path(boot.notice["path"])
    run_for = float(env.get("FAKE_RUN", "0"))
    started, noticed = time.time(), False
    while True:
        if "FAKE_EXIT" in env and time.time() - started >= run_for:
            log("exit", code=int(env["FAKE_EXIT"]))
            return int(env["FAKE_EXIT"])
        if not noticed and notice_path.exists():
            noticed = True
            left = json.loads(notice_path.read_text())["deadline"] - time.time()
            log("notice", seconds_left=left)
            if env.get("FAKE_ON_NOTICE") == "exit":
                log("exit", code=0)
                return 0
        time.sleep(0.02)


if __name__ == "__main__":
    sys.exit(main())
