"""A run directory and its identity: every file a run writes, with its typed reader and writer;
the sweep plan; the one labelling function; environment facts; signals; trackers' lifecycle; and
the ``run_task`` wrapper that turns whatever happened into a recorded status.

Imports: the standard library, omegaconf/hydra, lightning's loggers and ``moe_lab.utils``; never
``layers``, ``models``, ``data`` or ``lit``.
"""
