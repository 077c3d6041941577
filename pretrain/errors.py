"""The one exception type that reaches the user as a single line."""


class UserError(Exception):
    """Bad input the user can fix: a config field, a file, a shard.

    The message names the culprit and what to do; `pretrain/main.py` prints it as one line and
    exits non-zero, so no library stack trace hides it.
    """
