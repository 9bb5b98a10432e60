"""`python -m offspec` runs the command line."""

from offspec.cli import main

main()
