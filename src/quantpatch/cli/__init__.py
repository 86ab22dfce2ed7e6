"""The ``quantpatch`` command line: run, train, report, list, schema."""

from quantpatch.cli.main import main

__all__ = ["main"]
