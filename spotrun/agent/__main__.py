"""`python -m spotrun.agent [--boot-file PATH] [--root DIR]`."""

from __future__ import annotations

import sys

from spotrun.agent.main import main

sys.exit(main())
