"""`sqa-search export`."""

from ..decide.export import add_arguments, run  # noqa: F401  (moved here by the redesign)
