"""tda-bench's Hydra launcher plugin (``hydra/launcher=slurm``; see slurm_launcher.py).

Hydra accepts launchers only from the ``hydra_plugins`` namespace package, hence this home.
"""
