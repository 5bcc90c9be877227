"""The error every data setting raises, and the integer check the data modules share."""

from __future__ import annotations

import numpy as np

from ..errors import UserError


class DataError(UserError):
    """A data source, tokenizer or batch setting that cannot be used, raised before any work."""


def require_int(owner: str, field: str, value, low: int) -> None:
    """Raise DataError naming ``owner + field`` unless ``value`` is an integer >= ``low``
    (numpy integers count: batch settings often come from numpy arithmetic)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{owner}{field}={value!r} is not allowed: must be an integer")
    if value < low:
        raise DataError(f"{owner}{field}={value!r} is not allowed: must be >= {low}")
