"""Hydra configuration tree of tda-bench, shipped as package data so that `tda-bench` finds it
from an editable install and from a plain `pip install .` alike."""
