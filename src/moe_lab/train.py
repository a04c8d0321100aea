"""Train one model: ``python -m moe_lab.train [overrides]`` (``moe-train``); ``-m`` for sweeps.

Every run ends with ``summary.json`` in its output dir, whatever happened: status ``completed``,
``failed`` (with the error), ``diverged`` (with the epoch and step) or ``interrupted`` (SIGTERM or
SIGINT; the last epoch's checkpoint is kept and ``resume=RUN_DIR`` continues it). While it runs the
record says ``running`` and is rewritten after every epoch, so a run killed with SIGKILL still shows
how far it got. A failing job never stops the other jobs of a sweep; the sweep's report lists it and
the multirun exits non-zero at the end. A signal stops the whole sweep: the running jobs record
``interrupted``, the jobs not yet started are left for the report to list as missing, and the
multirun exits with ``128 + signal``.

A resume that cannot continue the same run (a different config, a missing or unreadable checkpoint)
is refused before anything in the run dir changes: the reason goes to stderr and the exit is 2.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from moe_lab import console
from moe_lab.assembly import RunParts, assemble_run
from moe_lab.config import (
    CONFIG_DIR,
    ConfigError,
    ResumeRefused,
    check_resume,
    require_config_dir,
    validate_train_config,
)
from moe_lab.layers import MoEBase
from moe_lab.lit import DivergedError
from moe_lab.lit.loggers import log_final_record
from moe_lab.models import ModelFacts
from moe_lab.run.record import METRICS_FILE, SUMMARY_FILE, RunSummary, validate_summary
from moe_lab.utils.io import atomic_write_json, atomic_write_text, remove_stale_tmp_files

log = logging.getLogger("moe_lab.train")

# -- Hydra context ----------------------------------------------------------------------------


def _hydra_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not running under Hydra (e.g. called from a notebook)
        return []


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _is_main_process() -> bool:
    return rank_zero_only.rank == 0


def _group_choice(group: str) -> str | None:
    try:
        return HydraConfig.get().runtime.choices.get(group)
    except ValueError:
        return None


# -- signals ----------------------------------------------------------------------------------

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The first SIGTERM/SIGINT this process received (None: none). It outlives the job it stopped:
#: a process that runs several jobs of a sweep starts none after it.
_received_signal: int | None = None
#: Set in the sweep's launching process (see :class:`SweepSignals`): jobs running in that same
#: process (the basic launcher) stop the sweep by exiting; jobs in worker processes (joblib)
#: return, so their workers finish writing before the launcher exits.
_SWEEP_PID_ENV = "MOE_LAB_SWEEP_PID"


class RunInterrupted(BaseException):
    """A SIGTERM or SIGINT stopped the run. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` on the way up swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


def _note_signal(signum: int, frame: Any) -> None:
    """Between jobs: remember the signal; the next job will not start."""
    global _received_signal
    _received_signal = _received_signal or signum


def _raise_on_signal(signum: int, frame: Any) -> None:
    """During a job: stop it where it is (once; repeats during the clean-up are only noted)."""
    global _received_signal
    first = _received_signal is None
    _received_signal = _received_signal or signum
    if first:
        raise RunInterrupted(signum)


@contextlib.contextmanager
def _signals_interrupt_the_run() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, _raise_on_signal) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            # a worker of a sweep keeps noting signals between its jobs
            default = handler in (signal.SIG_DFL, signal.default_int_handler, None)
            keep = _note_signal if _is_multirun() and default else handler
            signal.signal(s, keep)


class SweepSignals(HydraCallback):
    """Hydra callback: a SIGTERM or SIGINT to a multirun stops it cleanly.

    In the launching process it notes the signal and passes it on to the launcher's worker
    processes (joblib's), whose running jobs then record ``interrupted`` and which start no
    further jobs; when the launcher returns, the multirun exits with ``128 + signal`` (after the
    sweep report is written, as this callback is listed first).
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[_SWEEP_PID_ENV] = str(os.getpid())
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                signal.signal(s, self._forward)

    @staticmethod
    def _forward(signum: int, frame: Any) -> None:
        first = _received_signal is None
        _note_signal(signum, frame)
        if first:
            for pid in _launcher_workers():
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _received_signal is not None:
            name = signal.Signals(_received_signal).name
            print(
                f"[moe_lab] sweep stopped by {name}; finish it with: "
                f"python -m moe_lab.finish {config.hydra.sweep.dir}",
                file=sys.stderr,
            )
            raise SystemExit(128 + _received_signal)


def _launcher_workers() -> list[int]:
    """The pids of joblib's (loky's) worker processes under this process; never W&B's service
    nor loky's resource tracker, which must outlive the jobs they serve."""
    try:
        import psutil
    except ImportError:
        return []
    pids = []
    for child in psutil.Process().children(recursive=False):
        try:
            cmdline = " ".join(child.cmdline())
        except (psutil.Error, OSError):
            continue
        if "loky" in cmdline and "resource_tracker" not in cmdline:
            pids.append(child.pid)
    return pids


# -- the run record ---------------------------------------------------------------------------

# Routing options that differ from the layers' own defaults name a variant in the report
# (``top_k`` has a field of its own).
_ROUTING_OPTIONS = ("noisy_gating", "gate_input", "expert_backend")


def _routing_variant(moe_kwargs: Any) -> str | None:
    """E.g. ``"gate_input=pooled,noisy_gating=True"``; None for the original's routing."""
    defaults = inspect.signature(MoEBase.__init__).parameters
    changed = [
        f"{key}={moe_kwargs[key]}"
        for key in _ROUTING_OPTIONS
        if key in moe_kwargs and moe_kwargs[key] != defaults[key].default
    ]
    return ",".join(changed) or None


def _initial_summary(cfg: DictConfig, run_dir: Path) -> RunSummary:
    model_cfg = cfg.get("model") or {}
    experts_cfg = cfg.get("experts") or {}
    moe_kwargs = experts_cfg.get("moe_kwargs") or {}
    uses_experts = model_cfg.get("kind") != "cnn" or model_cfg.get("match")
    return RunSummary(
        experiment=cfg.get("experiment_name"),
        model=model_cfg.get("name"),
        data=_group_choice("data"),
        n_experts=experts_cfg.get("n_experts") if uses_experts else None,
        top_k=moe_kwargs.get("top_k"),
        routing=_routing_variant(moe_kwargs),
        seed=cfg.get("seed"),
        stage=cfg.get("stage"),
        arm=cfg.get("arm"),
        trial=cfg.get("trial"),
        max_epochs=(cfg.get("trainer") or {}).get("max_epochs"),
        status="running",
        run_dir=str(run_dir),
        overrides=_hydra_overrides(),
    )


def _previous_summary(run_dir: Path) -> RunSummary | None:
    """The record of the segment a resume continues (None if there is none or it is unusable)."""
    import json

    path = run_dir / SUMMARY_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if validate_summary(data):
        return None
    return RunSummary.from_dict(data)


def _record_facts(summary: RunSummary, facts: ModelFacts) -> None:
    summary.params = facts.params
    summary.flops_per_example = facts.flops_per_example
    summary.n_experts = facts.n_experts
    summary.width_multiplier = facts.width_multiplier
    summary.match = facts.match
    summary.match_target = facts.match_target


def _git_commit() -> str | None:
    """The commit of the moe_lab checkout this code runs from (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _record_environment(summary: RunSummary, trainer: L.Trainer) -> None:
    """What a result depends on besides the config."""
    device = trainer.strategy.root_device
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    summary.device = name
    summary.torch_threads = torch.get_num_threads()
    summary.torch_version = torch.__version__
    summary.lightning_version = L.__version__
    summary.git_commit = _git_commit()


def _record_history(summary: RunSummary, history: list[dict[str, float]]) -> None:
    accs = [r["val_acc"] for r in history if r.get("val_acc") == r.get("val_acc")]  # drop NaN
    summary.epochs = len(history)
    summary.val_acc_last = accs[-1] if accs else None
    summary.val_acc_best = max(accs) if accs else None


# -- W&B: one run per job ---------------------------------------------------------------------

# keys that never name a job: where it runs, what it logs, and the ones the name already shows
_UNNAMED_KEYS = ("experiment", "model", "experts", "seed", "resume", "paths", "hydra", "logger")


def _sweep_dir(run_dir: Path) -> Path | None:
    """The sweep this job belongs to: the multirun's dir, or (for a job that ``moe_lab.finish``
    reruns or resumes on its own) the run dir's parent when it holds the sweep's
    ``multirun.yaml``."""
    if _is_multirun():
        return Path(HydraConfig.get().sweep.dir)
    parent = run_dir.parent
    return parent if (parent / "multirun.yaml").is_file() else None


def _sweep_varying_keys(sweep_dir: Path | None) -> set[str] | None:
    """The override keys that take several values in the sweep (from its ``multirun.yaml``);
    None outside a sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sweep_dir is None:
        return None
    try:
        recorded = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
        # the config's sweeper params first: the command line overrides them, key by key
        overrides = [f"{k}={v}" for k, v in (recorded.sweeper.get("params") or {}).items()]
        overrides += list(recorded.overrides.task)
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # no readable record of the sweep: name the job by all its overrides
        return None
    last = {o.key_or_group: o for o in parsed}
    return {key for key, o in last.items() if o.is_sweep_override()}


def run_name(cfg: DictConfig, summary: RunSummary) -> str:
    """The job's name, e.g. ``moe K=2 lr=0.003 seed=1``: model, K, the overrides that vary
    across the sweep (every override of a single run) other than those, then the seed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parts = [str(summary.model)]
    if summary.n_experts is not None:
        parts.append(f"K={summary.n_experts}")
    varying = _sweep_varying_keys(_sweep_dir(Path(cfg.paths.output_dir)))
    try:
        job = OverridesParser.create().parse_overrides(_hydra_overrides())
    except Exception:
        job = []
    for override in job:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] in _UNNAMED_KEYS:
            continue
        if varying is not None and key not in varying:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        shown = value if isinstance(value, int | float | str | bool) else override.value()
        parts.append(f"{key.split('.')[-1]}={shown}")
    parts.append(f"seed={summary.seed}")
    return " ".join(parts)


def _run_group(cfg: DictConfig) -> str:
    """The sweep a job belongs to (``<experiment>/<sweep dir name>``), or the experiment."""
    experiment = str(cfg.get("experiment_name"))
    sweep_dir = _sweep_dir(Path(cfg.paths.output_dir))
    return experiment if sweep_dir is None else f"{experiment}/{sweep_dir.name}"


def _is_wandb_target(node: Any) -> bool:
    return OmegaConf.is_config(node) and str(node.get("_target_", "")).endswith(".WandbLogger")


def _plan_wandb(cfg: DictConfig, summary: RunSummary, previous: RunSummary | None) -> None:
    """Name, group and id of this job's W&B run, where the config leaves them null."""
    loggers = cfg.get("logger") or {}
    for key in list(loggers):
        node = loggers[key]
        if not _is_wandb_target(node):
            continue
        with open_dict(node):
            if node.get("name") is None:
                node.name = run_name(cfg, summary)
            if node.get("group") is None:
                node.group = _run_group(cfg)
            if node.get("id") is None and previous is not None and previous.wandb_id:
                node.id = previous.wandb_id  # a resumed run continues its W&B run


def _finish_stray_wandb_run() -> None:
    """Lightning's WandbLogger adopts the process's open ``wandb.run``: a job must never start
    inside a run another job left open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        log.warning("finishing a W&B run left open in this process (%s)", wandb.run.id)
        wandb.run.finish(exit_code=1)


def _finish_wandb(parts: RunParts | None, summary: RunSummary) -> None:
    """Finish each W&B run of the job (exit code 0 for completed, 1 otherwise, so W&B marks it
    failed); the record's final fields are in its summary already (``log_final_record``)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in parts.loggers if parts is not None else []:
        run = getattr(lg, "_experiment", None)
        if not isinstance(lg, WandbLogger) or run is None or not hasattr(run, "finish"):
            continue
        try:
            run.finish(exit_code=0 if summary.status == "completed" else 1)
        except Exception as err:  # W&B trouble must not cost the run's own record
            log.warning("could not finish the W&B run: %s: %s", type(err).__name__, err)
    _finish_stray_wandb_run()


def _log_hyperparams(parts: RunParts, cfg: DictConfig, summary: RunSummary) -> None:
    for lg in parts.loggers:
        lg.log_hyperparams(
            {
                "params": summary.params,
                "flops_per_example": summary.flops_per_example,
                "overrides": summary.overrides,
                "config": OmegaConf.to_container(cfg, resolve=True),
            }
        )
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "id"):
            summary.wandb_id = lg.experiment.id


# -- faults -----------------------------------------------------------------------------------


def _no_space(err: BaseException) -> OSError | None:
    """The ENOSPC error behind ``err`` (torch wraps it in a RuntimeError), if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class _EpochRecord(L.Callback):
    """Rewrites ``summary.json`` (status ``running``) after every epoch's checkpoint."""

    def __init__(self, write: Any) -> None:
        self.write = write

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(pl_module)


def _drop_resume_record(run_dir: Path) -> None:
    """Remove the ``.hydra_resume_*`` record Hydra wrote for a resume that was refused."""
    try:
        subdir = HydraConfig.get().output_subdir
    except ValueError:
        return
    if subdir and str(subdir).startswith(".hydra_resume_"):
        shutil.rmtree(run_dir / str(subdir), ignore_errors=True)


# -- the run ----------------------------------------------------------------------------------


def _fit_and_test(parts: RunParts, cfg: DictConfig, ckpt_path: str | None) -> float | None:
    """Fit, then score the test set once (unless ``test=false``); the test accuracy or None."""
    parts.trainer.fit(
        parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path, weights_only=True
    )
    if not cfg.get("test", True):
        return None
    # With a held-out validation split the test set is scored once, with the checkpoint that
    # validation chose; without one (the original's protocol) validation IS the test set.
    held_out = float(cfg.data.get("val_split", 0.0) or 0.0) > 0
    # fast_dev_run (or no checkpoint callback) saves no best checkpoint to test
    has_best = not parts.trainer.fast_dev_run and parts.trainer.checkpoint_callback
    parts.trainer.test(
        parts.module,
        datamodule=parts.datamodule,
        ckpt_path="best" if held_out and has_best else None,
        weights_only=True,
        verbose=False,
    )
    return parts.module.test_result.get("test_acc")


def _record_failure(summary: RunSummary, err: Exception, run_dir: Path) -> None:
    """Status ``failed`` with the error (a full disk named as such), the traceback in error.log."""
    full = _no_space(err)
    summary.status = "failed"
    if full is not None:
        summary.error_type = "OSError"
        summary.error_message = (
            f"no space left on device writing {full.filename or '(unknown path)'}"
        )
    else:
        summary.error_type, summary.error_message = type(err).__name__, str(err)
    if _is_main_process():
        with contextlib.suppress(OSError):
            atomic_write_text(run_dir / "error.log", traceback.format_exc())
    log.error("run failed: %s: %s", summary.error_type, summary.error_message)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg`` and return its summary (also written to disk).

    Raises:
        ResumeRefused: ``resume=`` cannot continue the run; nothing in its dir was changed.
    """
    run_dir = Path(cfg.paths.output_dir)
    summary = _initial_summary(cfg, run_dir)
    if _received_signal is not None:  # a signal stopped this sweep: start no further job
        summary.status = "interrupted"
        summary.error_message = "not started: the sweep was stopped by a signal"
        _discard_unstarted_job_dir(run_dir)
        return summary.to_dict()
    resuming = bool(cfg.get("resume"))
    previous: RunSummary | None = None
    if resuming:
        try:
            validate_train_config(cfg)
            ckpt_path = check_resume(cfg, run_dir)
        except ConfigError as err:
            _drop_resume_record(run_dir)
            raise err if isinstance(err, ResumeRefused) else ResumeRefused(str(err)) from None
        previous = _previous_summary(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        remove_stale_tmp_files(run_dir)
    console.start_run(cfg, run_dir)  # noise filters, config tree to the run's log
    base_wall = (previous.wall_time_s or 0.0) if previous else 0.0
    summary.segments = (previous.segments if previous else 0) + 1
    summary.wandb_id = previous.wandb_id if previous else None
    start = time.perf_counter()
    parts: RunParts | None = None

    def write_summary(module: Any = None, final: bool = False) -> None:
        if module is not None and module.history:
            _record_history(summary, module.history)
        elif previous is not None and summary.epochs == 0:
            # nothing trained in this segment (yet): keep what the earlier segments reached
            summary.epochs, summary.val_acc_last, summary.val_acc_best = (
                previous.epochs,
                previous.val_acc_last,
                previous.val_acc_best,
            )
        if not final:  # the final record keeps the time the trackers were given
            summary.wall_time_s = round(base_wall + time.perf_counter() - start, 3)
        if _is_main_process():  # DDP's other ranks run this function too
            atomic_write_json(run_dir / SUMMARY_FILE, summary.to_dict())

    with _signals_interrupt_the_run():
        try:
            try:
                if not resuming:
                    validate_train_config(cfg)
                    ckpt_path = None
                _plan_wandb(cfg, summary, previous)
                _finish_stray_wandb_run()
                quiet = {"enable_progress_bar": False, "enable_model_summary": False}
                parts = assemble_run(cfg, **(quiet if _is_multirun() else {}))
                parts.trainer.callbacks.append(_EpochRecord(write_summary))
                summary.data = parts.datamodule.name
                _record_facts(summary, parts.facts)
                _record_environment(summary, parts.trainer)
                parts.module.metrics_path = run_dir / METRICS_FILE
                _log_hyperparams(parts, cfg, summary)
                write_summary()

                summary.test_acc = _fit_and_test(parts, cfg, ckpt_path)
                if _received_signal is not None:  # noted while Lightning held the handler
                    raise RunInterrupted(_received_signal)
                summary.status = "completed"
            except (SystemExit, KeyboardInterrupt) as err:
                # Lightning turns SIGTERM and Ctrl-C into these when its own handlers see them first
                raise RunInterrupted(_received_signal or signal.SIGINT) from err
        except RunInterrupted as err:
            summary.status, summary.error_type, summary.error_message = (
                "interrupted",
                "RunInterrupted",
                f"{err}; resume with resume={run_dir}",
            )
            log.error("run interrupted (%s): resume with resume=%s", err, run_dir)
        except DivergedError as err:
            summary.status, summary.error_type, summary.error_message = (
                "diverged",
                type(err).__name__,
                str(err),
            )
            summary.diverged_at = {"epoch": err.epoch, "step": err.step}
            log.error("run diverged: %s", err)
        except Exception as err:  # a failing job must not sink the sweep: record it and move on
            _record_failure(summary, err, run_dir)
        finally:
            # a second signal during the clean-up must not cost the record
            with contextlib.suppress(RunInterrupted):
                summary.wall_time_s = round(base_wall + time.perf_counter() - start, 3)
                if parts is not None and _is_main_process():
                    if parts.module.history:
                        _record_history(summary, parts.module.history)
                    # the final record in each tracker's own place
                    log_final_record(parts.trainer.loggers, summary)
                try:
                    write_summary(parts.module if parts is not None else None, final=True)
                except OSError as err:
                    full = _no_space(err)
                    reason = "no space left on device" if full else str(err)
                    print(
                        f"error: could not write {run_dir / SUMMARY_FILE}: {reason}",
                        file=sys.stderr,
                    )
                _finish_wandb(parts, summary)
                if _is_main_process():
                    console.end_run(summary.to_dict())  # the end-of-run line
    return summary.to_dict()


def _discard_unstarted_job_dir(run_dir: Path) -> None:
    """A job a signal kept from starting leaves no dir, so the report lists it as missing (only
    Hydra's own record and log are removed; anything else keeps the dir)."""
    if not run_dir.is_dir():
        return
    entries = list(run_dir.iterdir())
    if all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log") for p in entries):
        shutil.rmtree(run_dir, ignore_errors=True)


def _exit_code(summary: dict[str, Any]) -> int:
    if summary["status"] == "interrupted" and _received_signal is not None:
        return 128 + _received_signal
    return 1


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except ResumeRefused as err:
        print(f"error: resume refused: {err}", file=sys.stderr)
        if not _is_multirun():
            sys.exit(2)
        return None
    # in the launching process (basic launcher) the sweep stops here; a joblib worker returns
    # and starts no further job, and the launching process exits once its workers are done
    in_launcher = os.environ.get(_SWEEP_PID_ENV, str(os.getpid())) == str(os.getpid())
    if summary["status"] == "interrupted" and _is_multirun() and in_launcher:
        raise SystemExit(_exit_code(summary))
    if summary["status"] != "completed" and not _is_multirun():
        print(
            f"error: run {summary['status']}: {summary['error_type']}: {summary['error_message']} "
            f"(summary in {summary['run_dir']}/summary.json)",
            file=sys.stderr,
        )
        sys.exit(_exit_code(summary))
    return summary.get("val_acc_best")


def main() -> None:
    """Entry point of ``python -m moe_lab.train`` and ``moe-train``."""
    require_config_dir("train")  # one line saying what to do, not Hydra's error, without configs
    _hydra_main()


__all__ = [
    "ConfigError",
    "ResumeRefused",
    "RunInterrupted",
    "SweepSignals",
    "main",
    "run_name",
    "train",
]

if __name__ == "__main__":
    # Run the package's module, not this ``__main__`` copy of it: the sweep's signal state (and the
    # task function that joblib's workers import by name) must be one module's, shared with the
    # Hydra callback that ``conf/hydra/default.yaml`` imports as ``moe_lab.train.SweepSignals``.
    from moe_lab.train import main as _main

    _main()
