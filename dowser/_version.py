"""The version of dowser: the one place it is written (pyproject reads it, dowser._C is stamped
with it at build time)."""

__version__ = "0.1.0"
