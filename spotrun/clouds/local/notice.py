"""The local market's preemption notice: a JSON file `{"deadline": <epoch seconds>}`.

The local provider writes the file (atomically) when it decides to take the instance back;
the Agent polls it like a cloud's metadata endpoint. Boot notice dict:
`{"kind": "local", "path": "/abs/notice.json", "poll_interval": 0.2}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from spotrun.clock import SYSTEM_CLOCK, Clock


class LocalNotice:
    def __init__(self, path: str, poll_interval: float = 0.2, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.poll_interval = float(poll_interval)
        self.clock = clock or SYSTEM_CLOCK
        self.acknowledged = False

    def check(self) -> float | None:
        try:
            raw = json.loads(self.path.read_text())
            deadline = float(raw["deadline"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # half-written or foreign content: not a notice (yet)
        return max(0.0, deadline - self.clock.now())

    def acknowledge(self) -> None:
        """Nothing to approve locally; recorded so tests can see the Agent called it."""
        self.acknowledged = True
