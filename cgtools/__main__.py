"""`python -m cgtools` = the `cgtools` command."""

from cgtools.cli.main import main

main()
