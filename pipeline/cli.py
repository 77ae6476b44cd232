"""`taps` command line: finds the command's module in :mod:`pipeline.app` and runs it.

Every failure the user can fix prints one line and exits 1 (2 for usage errors);
the last line a successful command prints is the path of what it made.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import warnings

from features.errors import TapsError
from features.runtime import limit_openmp_spinning

limit_openmp_spinning()  # libgomp reads it when torch loads it, so before anything imports torch

# Command -> its module in pipeline.app (HELP, add_arguments, run), in the order --help lists them.
COMMANDS = {"list": "listing", "extract": "extract", "merge": "merge", "info": "info", "export": "export",
            "fit": "fit", "compare": "compare", "bench": "bench", "predict": "predict"}
# Commands whose finished work survives an interruption and is picked up by the same command.
RESUMABLE = ("extract", "merge", "compare")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # no prefixes: `compare --features FILE` would silently be --features-root FILE (fit has --features)
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, the other commands' arguments are left out (their defaults and choices
    come from records whose modules import torch and scikit-learn)."""
    parser = _Parser(prog="taps", description="Cache frozen-CNN embeddings from layer taps, then fit linear classifiers.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module in COMMANDS.items():
        command = importlib.import_module(f"pipeline.app.{module}")
        p = sub.add_parser(name, help=command.HELP)
        p.set_defaults(func=command.run)
        if only is None or name == only:  # the others need only their name and help (no torch to import)
            command.add_arguments(p)
    for command in sub.choices.values():  # also after the command name
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an unexpected error")
        if not any("--no-progress" in action.option_strings for action in command._actions):
            # accepted everywhere, so a script can pass it to every command; these show no bar
            command.add_argument("--no-progress", dest="progress", action="store_false", help=argparse.SUPPRESS)
    parser.set_defaults(commands=sub.choices)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with an unknown option blamed on the command it was given to, and the closest
    options of that command suggested (``taps fit --datset`` -> did you mean --dataset?)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if a in COMMANDS), ""))  # options come after their command
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = args.commands[args.command]
        known = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
        flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag, known, n=2, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0, 1 (a failure named in one line), 2 (usage), 130 (Ctrl-C)."""
    args = _parse(argv)
    one_line = lambda message, category, *_, **__: f"taps {args.command}: warning: {message}\n"  # noqa: E731
    previous, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        with warnings.catch_warnings():
            # targets are class indices here: scikit-learn's guess that as many classes as samples "could
            # represent a regression problem" (every 1-shot fit of a shot curve) is a false alarm
            warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
            args.func(args)
    except TapsError as exc:
        print(f"taps {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # the reader (`| head`) stopped reading: stop quietly, as Unix tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        except (OSError, ValueError, AttributeError):  # stdout is no file (a test's capture)
            pass
        return 141
    except KeyboardInterrupt:
        kept = "; finished work is kept, rerun the same command to resume" if args.command in RESUMABLE else ""
        print(f"taps {args.command}: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, OSError) and exc.filename:  # the file system refused a path: full, a quota, no files
            print(f"taps {args.command}: error: cannot use {exc.filename} ({exc.strerror or exc}); check its free "
                  f"space and permissions, or pass another path", file=sys.stderr)
            return 1
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        print(f"taps {args.command}: error: unexpected {type(exc).__name__} ({reason}); rerun with --debug for the "
              f"traceback", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous
    return 0


if __name__ == "__main__":
    sys.exit(main())
