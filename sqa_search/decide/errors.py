"""The errors of `recommend` and `export`: a user's request that cannot be met as asked.

Here, not in recommend.py or export.py, because the parsers (parse.py), the exporter's
modules and the loader raise them too and none of those should import the commands' modules.
"""

from __future__ import annotations

from ..errors import UserError


class RecommendError(UserError):
    """A recommendation that cannot be made as asked; the message says which input and why."""


class ExportError(UserError):
    """An export that cannot be done as asked; the message names the option, the value and what is allowed."""
