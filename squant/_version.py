"""squant's version: one place, read by the package and written into every squant file."""

__version__ = "0.1.0"
