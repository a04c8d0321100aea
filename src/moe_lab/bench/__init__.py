"""``python -m moe_lab.bench``: moe_lab measured against what bounds it and what users would pick
instead, every figure side by side in one process (interleaved repeats, medians). Sections:

- ``layers``: each MoE layer of the original's networks, forward + backward, against its floor
  (its two unavoidable products), its roofline (floor + the epilogue's minimal bytes / this run's
  measured copy bandwidth) and the naive torch port of the original's ops;
- ``peers``: ``Conv2dMoE(expert_backend="kernel_mix")`` against timm's CondConv2d, sparse
  ``DenseMoE`` against the Mixtral-style per-expert loop and one ``nn.Linear``;
- ``routing``: K=16 experts, top-k, against k dense experts and all 16;
- ``lightning``: ``Trainer.fit`` against a plain loop at the mnist1d step;
- ``original``: the original's CIFAR-10 protocol, measured steps projected to the full run.

Writes ``bench.json`` (every row with its samples) and ``bench.md``, and prints the table.
"""

from .cli import SECTIONS, main, parse_args, run_bench

__all__ = ["SECTIONS", "main", "parse_args", "run_bench"]
