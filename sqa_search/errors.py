"""The one base class for a user's mistake (a bad flag, YAML value, file or folder).

Every module's own error (SpecError, SpaceError, StudyError, ...) derives from it, so the CLI
can print such an error as one line and exit 2, while any other exception is a bug in
sqa-search and keeps its traceback behind ``--debug``. The message names the field, the value
and what is allowed.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input from the user; the message says which field, which value and what is allowed."""
