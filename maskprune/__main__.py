"""`python -m maskprune ...` is the `maskprune` command."""
from .cli import main

main()
