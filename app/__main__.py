"""`python -m app` is the same as `python -m app.cli`."""

from app.cli import main

main()
