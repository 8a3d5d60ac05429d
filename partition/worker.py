"""`python -m partition.worker MODULE:FUNCTION ARGS RETURNS`: one rank of `launch_local`.

Ranks start as fresh interpreters, the way torchrun starts its workers, rather than
as multiprocessing children: the first thing they run is ours (`lifeline.hold`,
before torch is imported), and nothing crosses between launcher and rank as a
pickle — the arguments come as JSON on the command line, the return value goes
back as a JSON file, RETURNS/rank<RANK>.json.
"""

from __future__ import annotations

# Before anything else, and before any import that takes time.
from partition.lifeline import hold

if __name__ == "__main__":
    hold()

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402


def main(argv: list[str]) -> None:
    target, args_json, returns = argv
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    value: Any = fn(*json.loads(args_json))
    from partition.results import write_json

    write_json(os.path.join(returns, f"rank{os.environ['RANK']}.json"), value)


if __name__ == "__main__":
    main(sys.argv[1:])
