"""`sqa-search bench`."""

from ..speed.bench import add_arguments, run  # noqa: F401  (moved here by the redesign)
