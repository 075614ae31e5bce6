"""Runs the kbench command line: ``python cli.py train ...`` is ``kbench train ...``."""

from kbench.cli.main import main

if __name__ == "__main__":
    main()
