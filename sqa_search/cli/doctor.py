"""`sqa-search doctor`."""

from ..speed.doctor import add_arguments, run  # noqa: F401  (moved here by the redesign)
