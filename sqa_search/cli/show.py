"""`sqa-search show`."""

from ..search.report import add_arguments, run  # noqa: F401  (moved here by the redesign)
