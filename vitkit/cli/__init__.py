"""The ``vitkit`` command line. ``vitkit --help`` lists the sub-commands."""

from .main import main

__all__ = ["main"]
