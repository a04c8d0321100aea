"""Hydra discovers plugins in the ``hydra_plugins`` namespace: moe_lab's comparison sweeper."""
