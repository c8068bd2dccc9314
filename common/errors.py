"""The one exit rule of every command: a user's error is one line on stderr and exit status 2.

`UserError` marks what the user can fix (a bad flag, config, checkpoint or folder); the command line
(`commands.main`) prints its message as `bagel-ft CMD: error: MESSAGE` and exits 2, without a traceback
unless BAGEL_FT_TRACEBACK=1. Libraries raise their own subclasses (ConfigError, CheckpointError, RunDirError,
...) and never print or exit themselves.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names it (file, key, flag; expected vs got) and what to do."""
