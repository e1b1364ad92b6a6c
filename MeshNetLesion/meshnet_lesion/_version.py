"""The package version, in one place (pyproject.toml reads it; reports and ``--version`` print it)."""
__version__ = "0.1.0"
