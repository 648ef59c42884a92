"""`python -m blora_tools` runs the command line."""

from blora_tools.cli import run

run()
