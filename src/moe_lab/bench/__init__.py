"""``python -m moe_lab.bench`` (``moe-bench``): a benchmark suite that reports measured ratios
against the project's performance limits (issue #7).

Every figure is a candidate against a reference measured side by side in one process: warm-up,
then the median of at least 5 repeats, the candidate's and the reference's repeats interleaved so
that drift in the machine's load hits both. Sections:

- a. ``Conv{1,2,3}dMoE`` / ``DenseMoE`` forward + backward against the layer's floor (its two
  unavoidable products); target ratio <= 1.10.
- b. ``Trainer.fit(Classifier)`` throughput against a plain PyTorch loop on the same network and
  batches, bare and with progress bar / checkpoints / logging; target >= 0.95 (CPU), 0.90 (GPU).
- c. the real data path (the datamodule's loader) against one fixed in-memory batch; target
  >= 0.95 (CPU), 0.90 (GPU).
- d. sparse routing (16 experts, top-1) against one expert; target <= 1.5 (runs once the layers
  accept ``top_k``).
- e. the seed protocol run (16 epochs x 50k CIFAR-shaped images, batch 32), moe and cnn:
  img/s and the run time (extrapolated from measured steps; ``--full`` runs it); target for the
  MoE run <= 30 s on an H100.

Results go to ``bench.json`` (every row with its per-repeat samples) and ``bench.md`` in a new
output dir, and the table is printed.
"""

from .cli import default_out_dir, main, parse_args, run_bench
from .core import SECTIONS, BenchOptions, resolve_device

__all__ = [
    "SECTIONS",
    "BenchOptions",
    "default_out_dir",
    "main",
    "parse_args",
    "resolve_device",
    "run_bench",
]
