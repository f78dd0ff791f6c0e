"""Typer command groups of the `microupdates` CLI, one module per group."""
