"""Walk `taps fit`'s arguments: which project functions a fit runs, in the order a reader meets them.

Run: .venv/bin/python .ci/walk_fit.py FEATURES.h5 [fit arguments...]
Prints each project function the first time it is called (file:function) from the fit command's
``run`` (the parsed arguments) to the estimator's first ``fit`` (where every argument has arrived), then the counts the
structure issue measures: steps (distinct functions), files, and re-entries (entering a file the
walk already left: a jump back to a place read before). Library frames (sklearn, torch, numpy) are
not steps, nor is what a module's body calls while it is imported (a registry's ``register_*``:
a declaration, like the body itself); a function called again is not a new step; what runs after the fit (scoring, writing
the run folder) is not part of the arguments' walk.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = (str(ROOT / "features"), str(ROOT / "pipeline"))


def _importing(frame) -> bool:
    """Whether ``frame`` runs under a project module's body (an import: declarations, not steps)."""
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_code.co_filename.startswith(PROJECT):
            return True
        frame = frame.f_back
    return False


def main(argv: list[str]) -> int:
    from pipeline.cli import main as taps

    seen: dict[tuple[str, str], int] = {}

    def profile(frame, event, arg):
        # functions only: module and class bodies run at import, they are declarations, not steps
        if event == "call" and frame.f_code.co_flags & inspect.CO_OPTIMIZED and \
                frame.f_code.co_filename.startswith(PROJECT):
            key = (str(Path(frame.f_code.co_filename).relative_to(ROOT)), frame.f_code.co_qualname)
            if "<" not in key[1] and not _importing(frame):  # comprehensions and lambdas are part of the
                seen.setdefault(key, len(seen))  # function that holds them

    sys.setprofile(profile)
    try:
        code = taps(["fit", "--features", argv[0], "--no-progress", *argv[1:]])
    finally:
        sys.setprofile(None)
    walk = sorted(seen, key=seen.get)
    arrived = next(i for i, (_, function) in enumerate(walk) if function.endswith(".fit"))
    walk = walk[walk.index(("pipeline/app/fit.py", "run")):arrived + 1]
    files, reentries, last = [], 0, None
    for file, function in walk:
        print(f"{file}:{function}")
        if file != last:
            reentries += file in files
            files += [file] if file not in files else []
            last = file
    print(f"exit {code}; steps {len(walk)}, files {len(files)}, re-entries {reentries}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
