"""Run the CLI as `python -m microupdates.cli`."""

from microupdates.cli.main import app

app(prog_name="microupdates")
