"""`sqa-search recommend`."""

from ..decide.recommend import add_arguments, run  # noqa: F401  (moved here by the redesign)
