"""``python -m bench`` is ``tda-bench``."""

from bench.cli import main

main()
