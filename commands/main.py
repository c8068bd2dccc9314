"""The `bagel-ft` console script: one subcommand per job, the application layer above the libraries.

Each entry names a module providing `add_arguments(parser)` and `run(args) -> int`; a module is
imported only when its subcommand runs (or for its own --help), so start-up pays only for the job asked for.

Exit status, the same for every subcommand: 0 done; 1 the job failed (e.g. training stopped on non-finite
losses); 2 the user's error (a bad flag, config value, checkpoint or folder): one line
`bagel-ft CMD: error: MESSAGE` naming the problem and what to do, no traceback unless BAGEL_FT_TRACEBACK=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from common.errors import UserError

VERSION = "0.1.0"  # setup.py reads it from here

# subcommand -> (module, one-line help). Later packages register here.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "model": ("commands.model", "build / load a model, save it, and run a packed forward pass"),
    "eval": ("commands.eval", "evaluate on GenEval | WISE | ShapesEval"),
    "report": ("commands.report", "compare eval runs in markdown + HTML"),
    "data": ("commands.data", "synthesize training data: trajectories | critiques | alignment"),
    "train": ("commands.train", "fine-tune a Bagel model on trajectory datasets"),
    "generate": ("commands.generate", "generate images + PSIR trajectories from prompts"),
    "demo": ("commands.demo", "run the whole system on the shapes world: data, fine-tune, PSIR, eval, report"),
}
# what counts as the user's error: ours (UserError: ConfigError, CheckpointError, RunDirError, ...), a missing
# or unreadable file, a bad value; `raise SystemExit("message")` in a command is one too
USER_ERRORS = (UserError, OSError, ValueError, KeyError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser: every subcommand is listed, but only `command`'s module is imported (start-up
    stays fast: `bagel-ft --help` imports none, `bagel-ft train ...` imports only `commands.train`)."""
    parser = argparse.ArgumentParser(
        prog="bagel-ft", description="Plan -> Sketch -> Inspect -> Refine for BAGEL models"
    )
    parser.add_argument("--version", action="version", version=f"bagel-ft {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        return user_error(args.command, e.code, e)
    except USER_ERRORS as e:
        return user_error(args.command, str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e), e)


def user_error(command: str, message: str, error: BaseException) -> int:
    """Print `bagel-ft CMD: error: MESSAGE` (one line per line of the message) and return 2; the traceback
    only with BAGEL_FT_TRACEBACK=1. Our errors name the file, key and expected-vs-got, so the message is the
    answer."""
    if os.environ.get("BAGEL_FT_TRACEBACK"):
        raise error
    print(f"bagel-ft {command}: error: {message}\n(set BAGEL_FT_TRACEBACK=1 for the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
