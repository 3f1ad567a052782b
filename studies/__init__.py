"""Runnable studies and benchmarks (``python -m studies.<name>``); their output lands in
``results/``. Studies import the library; the library never imports studies."""
