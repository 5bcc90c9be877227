"""`sqa-search run`."""

from ..search.engine import add_arguments, run  # noqa: F401  (moved here by the redesign)
