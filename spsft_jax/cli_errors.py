"""How `spsft-jax` reports a user's error: `UsageError` for a bad command line, and
`_message`, the one line any user error is printed as.

A leaf module: every other `cli_*` module may import it, it imports none of them.
"""
from __future__ import annotations


class UsageError(Exception):
    """A bad command line (argparse's complaint), reported on one line."""


# The library's words for options, as the command line spells them.
CLI_WORDS = ((r"allow_nonfinite=True / --allow-nonfinite", "--allow-nonfinite"),
             (r"allow_nonfinite=True", "--allow-nonfinite"), (r"overwrite=True", "--overwrite"),
             (r"truncate='error'", "--truncate error"), (r"max_new_tokens=", "--max-new-tokens "),
             (r"(?<![-\w])max_len\b", "--max-len"))


def _message(err: BaseException) -> str:
    """One line for a user error: file-system errors name their file, options are spelled
    as on the command line."""
    import re

    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and getattr(err, "filename", None):
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    for library, command_line in CLI_WORDS:
        text = re.sub(library, command_line, text)
    return " ".join(text.split())
