"""Package version, single-sourced for pyproject and the instrumentation scope."""

__version__ = "0.1.0"
