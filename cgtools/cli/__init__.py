"""The `cgtools` command line: one thin typer module per command over one library function."""
