"""`python -m cupyflash ...` runs the command-line interface (same as the `cupyflash` script)."""

from .cli import main

main()
