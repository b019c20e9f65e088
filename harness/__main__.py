"""`python -m harness` is `python -m harness.sweep`."""

from harness.sweep import cli

cli()
