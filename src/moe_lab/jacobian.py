"""``python -m moe_lab.jacobian [overrides]`` (``moe-jacobian``): the Jacobian-spectrum experiment.

    python -m moe_lab.jacobian                                   # the original's setting
    python -m moe_lab.jacobian n_experts=[1,20] n_inputs=50 width=64 expert_activation=tanh seed=1

The settings are ``conf/jacobian.yaml``; the computation is :mod:`moe_lab.experiments.jacobian`,
the run dir's files and record :mod:`moe_lab.run.jacobian_record`. Writes the spectra table, the
figure and the record in the Hydra run dir and prints the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from moe_lab.config import CONFIG_DIR, require_config_dir
from moe_lab.experiments.jacobian import (
    JacobianSettings,
    format_table,
    run_experiment,
    write_outputs,
)


@hydra.main(config_path=str(CONFIG_DIR), config_name="jacobian", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    start = time.perf_counter()
    settings = JacobianSettings.from_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    result = run_experiment(settings)
    wall = time.perf_counter() - start
    paths = write_outputs(
        result,
        output_dir,
        wall_time_s=round(wall, 3),
        run_dir=str(output_dir),
        overrides=list(HydraConfig.get().overrides.task),
    )
    print(format_table(result))
    print(f"\nwrote in {output_dir} ({wall:.1f} s):")
    for name in paths:
        print(f"  {name}")


def main() -> None:
    """Entry point of ``python -m moe_lab.jacobian`` and ``moe-jacobian``."""
    require_config_dir("jacobian")
    _hydra_main()


if __name__ == "__main__":
    main()
