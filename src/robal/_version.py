"""The version of robal, set here and nowhere else (pyproject.toml reads it without importing robal)."""
__version__ = "0.1.0"
