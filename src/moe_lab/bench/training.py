"""Sections b, c and e: training throughput, measured on the project's own training pieces.

b. ``Trainer.fit`` of :class:`~moe_lab.lit.Classifier` against a plain PyTorch loop doing the same
   forward / cross-entropy / backward / optimizer and scheduler step on the same network, the same
   batches (fixed tensors on the device), batch size and precision. Once bare (no progress bar,
   checkpointing, logging or validation) and once with them on (then both sides also run the same
   validation pass each epoch).
c. The same plain loop fed by the datamodule's real loader (a DataLoader with per-sample
   augmentation on CPU, the on-device ResidentLoader on CUDA) over a CIFAR-shaped synthetic
   dataset with the seed's augmentation, against the loop fed one fixed batch already in memory.
e. The seed protocol (``experiment=seed_cifar10``: RMSprop with Keras decay, batch 32, 16 epochs
   of 50k images, the 10k test set as validation) for moe and cnn: measured steps through
   ``Trainer.fit`` on the real data path, extrapolated to the full run; ``--full`` runs it.

The optimizer, schedule, batch size and models come from the Hydra configs (``conf/``), composed
as ``python -m moe_lab.train experiment=seed_cifar10`` would.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.fabric.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig
from torch import Tensor, nn

from moe_lab.config import CONFIG_DIR
from moe_lab.data.base import BaseDataModule, Split
from moe_lab.lit import AtomicCheckpointIO, Classifier, DivergenceMonitor

from .core import BenchContext, SectionResult, silenced
from .report import Target, make_row
from .timing import Clock, interleave, median

__all__ = [
    "CIFAR_TEST",
    "CIFAR_TRAIN",
    "FitTimer",
    "PlainLoop",
    "SyntheticImages",
    "TensorBatches",
    "compose_protocol",
    "run_data_path",
    "run_fit",
    "run_seed_protocol",
]

#: the experiment config the training figures follow
PROTOCOL = "seed_cifar10"
#: CIFAR-10's split sizes (the seed run: 50k training images, the 10k test set as validation)
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
#: seconds the seed run of the MoE model may take on an H100 (issue #7)
SEED_RUN_TARGET_S = 30.0


def _fit_target(ctx: BenchContext) -> Target:
    """Lightning / data-path throughput ratios: >= 0.90 on GPU, >= 0.95 on CPU."""
    return Target(">=", 0.90 if ctx.is_cuda else 0.95)


# -- configs, data, networks ------------------------------------------------------------------------


def compose_protocol(data: str, model: str, output_dir: Path) -> DictConfig:
    """The training config of ``python -m moe_lab.train experiment=seed_cifar10 data=<data>
    model=<model> logger=csv``, with every path inside ``output_dir``."""
    from hydra import compose, initialize_config_dir

    overrides = [
        f"experiment={PROTOCOL}",
        f"data={data}",
        f"model={model}",
        "logger=csv",
        f"paths.root_dir={output_dir}",
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={output_dir / 'data'}",
    ]
    with (
        warnings.catch_warnings(),
        initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"),
    ):
        warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema")
        return compose("train", overrides=overrides)


class SyntheticImages(BaseDataModule):
    """Random uint8 samples of any shape, served by :class:`~moe_lab.data.BaseDataModule`'s real
    loaders: CIFAR-10's data path (uint8 pixels scaled by 1/255, the seed's shift + flip
    augmentation, DataLoader or ResidentLoader) without its files.

    Args:
        input_shape: one sample's ``(C, *spatial)``.
        num_classes: labels are drawn uniformly from ``0 .. num_classes - 1``.
        n_train, n_test: split sizes.
        data_dir, **kwargs: as :class:`~moe_lab.data.BaseDataModule` (nothing is read or
            written there).
    """

    name = "synthetic"
    pixel_scale = 1.0 / 255.0

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        n_train: int,
        n_test: int,
        data_dir: str | Path,
        **kwargs: Any,
    ) -> None:
        self.input_shape = tuple(int(n) for n in input_shape)
        self.num_classes = int(num_classes)
        self.n_train, self.n_test = int(n_train), int(n_test)
        super().__init__(data_dir, **kwargs)

    def _load_splits(self) -> tuple[Split, Split]:
        generator = torch.Generator().manual_seed(0)

        def split(n: int) -> Split:
            x = torch.randint(
                0, 256, (n, *self.input_shape), dtype=torch.uint8, generator=generator
            )
            y = torch.randint(0, self.num_classes, (n,), generator=generator)
            return x, y

        return split(self.n_train), split(self.n_test)


class TensorBatches:
    """Consecutive ``batch_size`` slices of ``(x, y)`` (the last partial one dropped), in order,
    every epoch: a loader that both ``Trainer.fit`` and the plain loop can iterate, so they see
    exactly the same batches."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        if x.shape[0] < batch_size:
            raise ValueError(f"{x.shape[0]} samples do not fill one batch of {batch_size}")
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return self.x.shape[0] // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.batch_size
        for i in range(len(self)):
            yield self.x[i * b : (i + 1) * b], self.y[i * b : (i + 1) * b]


def build_net(ctx: BenchContext, cfg: DictConfig, input_shape: Sequence[int]) -> nn.Module:
    """The config's network on the device; channels_last (2D inputs) and compiled in place under
    the bench's options, as ``moe_lab.train`` does."""
    torch.manual_seed(0)
    net, _ = instantiate(cfg.model)(input_shape=tuple(input_shape), num_classes=10)
    net = net.to(ctx.device)
    if ctx.options.channels_last and len(input_shape) == 3:
        net = net.to(memory_format=torch.channels_last)
    if ctx.options.compile:
        net.compile()
    return net


def make_classifier(ctx: BenchContext, cfg: DictConfig, net: nn.Module) -> Classifier:
    """:class:`~moe_lab.lit.Classifier` around ``net`` with the config's optimizer and schedule."""
    return Classifier(
        net,
        num_classes=10,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        scheduler_interval=cfg.get("scheduler_interval", "step"),
        channels_last=ctx.options.channels_last,
    )


# -- the plain loop ---------------------------------------------------------------------------------


class PlainLoop:
    """The work of a training step in plain PyTorch: forward and cross-entropy (under autocast for
    bf16-mixed), ``zero_grad``, backward, optimizer step, scheduler step. No metrics, hooks or
    callbacks: what Lightning's automatic optimisation is measured against."""

    def __init__(self, ctx: BenchContext, cfg: DictConfig, net: nn.Module) -> None:
        self.ctx, self.net = ctx, net
        self.optimizer = instantiate(cfg.optimizer)(net.parameters())
        self.scheduler = (
            instantiate(cfg.scheduler)(self.optimizer) if cfg.get("scheduler") else None
        )
        self.channels_last = ctx.options.channels_last

    def _format(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            return x.contiguous(memory_format=fmt)
        return x

    def step(self, x: Tensor, y: Tensor) -> None:
        with self.ctx.autocast():
            loss = F.cross_entropy(self.net(self._format(x)), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def evaluate(self, batches: TensorBatches) -> Tensor:
        """Validation pass: logits, cross-entropy and correct count per batch, as the
        classifier's validation step; returns the correct count (on the device)."""
        self.net.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.ctx.device)
        with torch.inference_mode(), self.ctx.autocast():
            for x, y in batches:
                logits = self.net(self._format(x))
                F.cross_entropy(logits, y)
                correct += (logits.argmax(-1) == y).sum()
        self.net.train()
        return correct

    def run_epoch(
        self, batches: TensorBatches, skip: int, val: TensorBatches | None = None
    ) -> float:
        """One epoch over ``batches`` (then a validation pass over ``val``); seconds per training
        step from the start of step ``skip`` (the ones before are warm-up) to the end, validation
        included."""
        if not 0 <= skip < len(batches):
            raise ValueError(f"skip must be in [0, {len(batches)}), got {skip}")
        self.net.train()
        clock = self.ctx.clock
        start, steps = 0.0, 0
        for i, (x, y) in enumerate(batches):
            if i == skip:
                start = clock.now()
            self.step(x, y)
            steps += i >= skip
        if val is not None:
            self.evaluate(val)
        return (clock.now() - start) / steps


# -- Lightning ----------------------------------------------------------------------------------


class FitTimer(L.Callback):
    """Times one ``fit`` from the start of training epoch ``start_epoch`` (or, with
    ``start_batch``, of that training batch counted over the whole fit) to the end of training
    (after the last validation and checkpoint); :attr:`seconds_per_step` is that time divided by
    the optimizer steps taken in it."""

    def __init__(self, clock: Clock, start_epoch: int = 1, start_batch: int | None = None) -> None:
        self.clock, self.start_epoch, self.start_batch = clock, start_epoch, start_batch
        self._start: float | None = None
        self._steps0 = 0
        self._batches = 0
        self.seconds = float("nan")
        self.steps = 0

    def _mark(self, trainer: L.Trainer) -> None:
        self._start = self.clock.now()
        self._steps0 = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start_batch is None and trainer.current_epoch == self.start_epoch:
            self._mark(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.start_batch is not None and self._batches == self.start_batch:
            self._mark(trainer)
        self._batches += 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            raise RuntimeError("FitTimer never started: the fit ended before its start epoch/batch")
        self.seconds = self.clock.now() - self._start
        self.steps = trainer.global_step - self._steps0

    @property
    def seconds_per_step(self) -> float:
        if self.steps < 1:
            raise RuntimeError("FitTimer measured no optimizer step")
        return self.seconds / self.steps


@contextlib.contextmanager
def _quiet_lightning(silence_output: bool) -> Iterator[None]:
    """Lightning's banners and its 'possible user' warnings off; stdout/stderr (progress bar) to
    /dev/null when asked."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*no validation set.*|.*val_dataloader.*")
            warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
            with silenced() if silence_output else contextlib.nullcontext():
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def trainer_for(
    ctx: BenchContext,
    workdir: Path,
    *,
    cfg: DictConfig | None = None,
    callbacks: Sequence[L.Callback] = (),
    **kwargs: Any,
) -> L.Trainer:
    """A Trainer as ``conf/trainer/{cpu,gpu}.yaml`` make one, bare unless ``cfg`` is given: then
    with the config's callbacks (checkpoints, divergence monitor), its CSV logger, the atomic
    checkpoint IO and a progress bar."""
    settings: dict[str, Any] = dict(
        accelerator="gpu" if ctx.is_cuda else "cpu",
        devices=1,
        precision=ctx.lightning_precision,
        deterministic=False,
        benchmark=True if ctx.is_cuda else None,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        enable_model_summary=False,
        default_root_dir=str(workdir),
    )
    if cfg is None:
        settings.update(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            callbacks=list(callbacks),
        )
    else:
        configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
        settings.update(
            logger=[instantiate(c) for c in (cfg.get("logger") or {}).values() if c],
            enable_checkpointing=True,
            enable_progress_bar=True,
            callbacks=[*configured, *callbacks],
            plugins=[AtomicCheckpointIO()],
        )
    settings.update(kwargs)
    return L.Trainer(**settings)


# -- b --------------------------------------------------------------------------------------------


#: (train, validation) sizes of the datasets the section b figure imitates; validation is the test
#: set (the seed protocol's val_split=0)
EPOCH_SIZES = {"mnist1d": (4000, 1000), "cifar10": (50_000, 10_000)}


def _fit_sizes(ctx: BenchContext, data: str, batch: int, eval_batch: int) -> tuple[int, int, int]:
    """(steps in the epoch, warm-up steps, validation batches) of a section b fit: one real
    epoch of ``data`` (so that per-epoch costs, validation and checkpoints, weigh as in a run), or
    a short one under ``--quick``."""
    n_train, n_val = EPOCH_SIZES[data]
    if ctx.quick:
        return (200, 20, 1) if ctx.is_cuda else (30, 3, 1)
    steps = n_train // batch
    return steps, (50 if ctx.is_cuda else 10), -(-n_val // eval_batch)


def run_fit(ctx: BenchContext) -> SectionResult:
    """Section b."""
    result = SectionResult()
    # CPU: the MNIST-1D network (what this machine trains); GPU: the seed CIFAR MoE
    data = "cifar10" if ctx.is_cuda else "mnist1d"
    workdir = ctx.scratch / "b"
    cfg = compose_protocol(data, "moe", workdir)
    input_shape = (3, 32, 32) if data == "cifar10" else (1, 40)
    batch = int(cfg.data.batch_size)
    eval_batch = _eval_batch(cfg)
    steps, skip, val_batches = _fit_sizes(ctx, data, batch, eval_batch)
    generator = torch.Generator(device=ctx.device).manual_seed(0)

    def tensors(n: int) -> tuple[Tensor, Tensor]:
        x = torch.rand((n, *input_shape), generator=generator, device=ctx.device)
        y = torch.randint(0, 10, (n,), generator=generator, device=ctx.device)
        return x, y

    train = TensorBatches(*tensors(steps * batch), batch)
    val = TensorBatches(*tensors(val_batches * eval_batch), eval_batch)
    net = build_net(ctx, cfg, input_shape)
    lit = make_classifier(ctx, cfg, net)
    lit.metrics_path = workdir / "metrics.csv"
    plain = PlainLoop(ctx, cfg, net)

    for features in (False, True):

        def candidate(features: bool = features) -> float:
            # every fit starts from an empty run dir, as a fresh run would
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
            shutil.rmtree(workdir / "csv", ignore_errors=True)
            timer = FitTimer(ctx.clock, start_batch=skip)
            with _quiet_lightning(silence_output=features):
                trainer = trainer_for(
                    ctx, workdir, cfg=cfg if features else None, callbacks=[timer], max_epochs=1
                )
                trainer.fit(lit, train_dataloaders=train, val_dataloaders=val if features else None)
            return timer.seconds_per_step

        def reference(features: bool = features) -> float:
            return plain.run_epoch(train, skip, val if features else None)

        samples = interleave(candidate, reference, warmup=1, repeats=ctx.repeats)
        extra = (
            "progress bar, checkpoints (best + last), CSV logging, metrics.csv and a validation "
            f"pass ({len(val)}×{eval_batch}) at the epoch's end; the plain loop runs the same "
            "validation"
            if features
            else "no progress bar, checkpointing, logging or validation"
        )
        row = make_row(
            section="b",
            name=f"{data}-shaped moe, B={batch}, {'with' if features else 'without'} "
            "progress bar/checkpoints/logging",
            candidate="Trainer.fit(Classifier)",
            reference="plain PyTorch loop",
            samples=samples,
            metric="throughput",
            target=_fit_target(ctx),
            device=ctx.device,
            items_per_unit=batch,
            note=f"one epoch of {steps} steps per repeat, the last {steps - skip} timed; {extra}",
            batch=batch,
            steps_per_epoch=steps,
            timed_steps=steps - skip,
            features=features,
            data_shape=list(input_shape),
        )
        result.rows.append(row)
        ctx.log(_progress(row))
    return result


# -- c --------------------------------------------------------------------------------------------


def synthetic_cifar(
    ctx: BenchContext, cfg: DictConfig, n_train: int, n_test: int, workdir: Path
) -> SyntheticImages:
    """A CIFAR-shaped synthetic datamodule with the config's batch size and augmentation, on the
    bench's device (``loader: auto``: DataLoader on CPU, ResidentLoader on CUDA)."""
    dm = SyntheticImages(
        input_shape=(3, 32, 32),
        num_classes=10,
        n_train=n_train,
        n_test=n_test,
        data_dir=workdir / "data",
        batch_size=int(cfg.data.batch_size),
        augment=bool(cfg.data.augment),
        num_workers=int(cfg.data.num_workers),
        loader=str(cfg.data.loader),
        seed=0,
    )
    dm.to_device(ctx.device)
    dm.setup("fit")
    return dm


def _data_steps(ctx: BenchContext) -> int:
    """Steps (one epoch) per repeat of the section c figure."""
    if ctx.is_cuda:
        return 50 if ctx.quick else 200
    return 4 if ctx.quick else 10


def run_data_path(ctx: BenchContext) -> SectionResult:
    """Section c."""
    result = SectionResult()
    workdir = ctx.scratch / "c"
    cfg = compose_protocol("cifar10", "moe", workdir)
    batch = int(cfg.data.batch_size)
    steps = _data_steps(ctx)
    dm = synthetic_cifar(ctx, cfg, steps * batch, batch, workdir)
    loader = dm.train_dataloader()
    net = build_net(ctx, cfg, dm.input_shape)
    plain = PlainLoop(ctx, cfg, net)
    clock = ctx.clock
    fixed_x, fixed_y = next(iter(loader))
    fixed_x, fixed_y = fixed_x.to(ctx.device), fixed_y.to(ctx.device)

    def candidate() -> float:
        start, n = clock.now(), 0
        for x, y in loader:
            plain.step(x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True))
            n += 1
        return (clock.now() - start) / n

    def reference() -> float:
        start = clock.now()
        for _ in range(steps):
            plain.step(fixed_x, fixed_y)
        return (clock.now() - start) / steps

    net.train()
    samples = interleave(candidate, reference, warmup=1, repeats=ctx.repeats)
    kind = dm.resolved_loader()
    loader_text = (
        "ResidentLoader (on-device batches)"
        if kind == "resident"
        else f"DataLoader (num_workers={dm.num_workers}, per-sample augmentation)"
    )
    row = make_row(
        section="c",
        name=f"CIFAR-shaped moe, B={batch}, augment={dm.augment}",
        candidate=f"loop fed by the datamodule's {loader_text}",
        reference="loop fed one fixed in-memory batch",
        samples=samples,
        metric="throughput",
        target=_fit_target(ctx),
        device=ctx.device,
        items_per_unit=batch,
        note=f"one epoch of {steps} steps per repeat (synthetic uint8 CIFAR, real loader path)",
        batch=batch,
        steps_per_repeat=steps,
        loader=kind,
    )
    result.rows.append(row)
    ctx.log(_progress(row))
    return result


# -- e --------------------------------------------------------------------------------------------


def _seed_sizes(ctx: BenchContext) -> tuple[int, int]:
    """(warm-up steps, timed steps) of each section e fit."""
    if ctx.is_cuda:
        return (20, 60) if ctx.quick else (30, 200)
    return (2, 5) if ctx.quick else (3, 20)


def run_seed_protocol(ctx: BenchContext) -> SectionResult:
    """Section e."""
    result = SectionResult()
    skip, steps = _seed_sizes(ctx)
    models = ("moe", "cnn")
    parts: dict[str, dict[str, Any]] = {}
    for model in models:
        workdir = ctx.scratch / "e" / model
        cfg = compose_protocol("cifar10", model, workdir)
        batch = int(cfg.data.batch_size)
        dm = synthetic_cifar(ctx, cfg, (skip + steps) * batch, batch, workdir)
        net = build_net(ctx, cfg, dm.input_shape)
        lit = make_classifier(ctx, cfg, net)
        parts[model] = dict(cfg=cfg, dm=dm, net=net, lit=lit, workdir=workdir, batch=batch)

    def fit_steps(model: str) -> Callable[[], float]:
        part = parts[model]

        def run() -> float:
            timer = FitTimer(ctx.clock, start_batch=skip)
            with _quiet_lightning(silence_output=False):
                trainer = trainer_for(
                    ctx,
                    part["workdir"],
                    callbacks=[DivergenceMonitor(), timer],
                    max_epochs=1,
                    max_steps=skip + steps,
                )
                trainer.fit(part["lit"], datamodule=part["dm"])
            return timer.seconds_per_step

        return run

    train = interleave(fit_steps("moe"), fit_steps("cnn"), warmup=1, repeats=ctx.repeats)
    evaluation = interleave(
        _eval_forward(ctx, parts["moe"]),
        _eval_forward(ctx, parts["cnn"]),
        warmup=1,
        repeats=ctx.repeats,
    )
    cfg = parts["moe"]["cfg"]
    epochs = int(cfg.trainer.max_epochs)
    batch = parts["moe"]["batch"]
    eval_batch = _eval_batch(cfg)

    def run_seconds(train_s: float, eval_s: float) -> float:
        """Training steps of every epoch plus a validation pass over the test set each epoch."""
        # the DataLoader keeps the last partial batch; the resident loader drops it
        resident = parts["moe"]["dm"].resolved_loader() == "resident"
        train_steps = CIFAR_TRAIN // batch if resident else -(-CIFAR_TRAIN // batch)
        eval_steps = -(-CIFAR_TEST // eval_batch)
        return epochs * (train_steps * train_s + eval_steps * eval_s)

    measured = ctx.repeats * steps
    estimate = (
        f"extrapolated from {measured} measured steps ({ctx.repeats}×{steps}) and "
        f"{ctx.repeats} eval batches of {eval_batch} per model"
    )
    run_s = {
        model: run_seconds(median(s), median(e))
        for model, s, e in (
            ("moe", train.candidate, evaluation.candidate),
            ("cnn", train.reference, evaluation.reference),
        )
    }
    if ctx.options.full:
        for model in models:
            run_s[model] = _full_run(ctx, parts[model])
        estimate = "measured: one full run per model (--full)"
    target = Target(
        "<=",
        SEED_RUN_TARGET_S,
        of="candidate_run_s",
        devices=("cuda",),
        text=f"moe run ≤ {SEED_RUN_TARGET_S:g} s (H100)",
    )
    row = make_row(
        section="e",
        name=f"seed run ({epochs} epochs × {CIFAR_TRAIN // 1000}k, B={batch}), train step",
        candidate="moe Trainer.fit",
        reference="cnn Trainer.fit",
        samples=train,
        metric="throughput",
        target=target,
        device=ctx.device,
        items_per_unit=batch,
        note=(
            f"run time moe {run_s['moe']:.0f} s, cnn {run_s['cnn']:.0f} s: {estimate}; "
            "real data path (synthetic CIFAR, augmentation), RMSprop + Keras decay"
        ),
        batch=batch,
        candidate_run_s=run_s["moe"],
        reference_run_s=run_s["cnn"],
        run_estimate=estimate,
        measured_steps=measured,
        eval_batch=eval_batch,
        candidate_eval_s=median(evaluation.candidate),
        reference_eval_s=median(evaluation.reference),
        candidate_eval_samples_s=evaluation.candidate,
        reference_eval_samples_s=evaluation.reference,
        epochs=epochs,
    )
    result.rows.append(row)
    ctx.log(_progress(row))
    if not ctx.options.full:
        result.notes.append(
            f"e: run times are {estimate}; `--full` runs the {epochs}-epoch protocol itself."
        )
    return result


def _eval_batch(cfg: DictConfig) -> int:
    configured = cfg.data.get("eval_batch_size")
    return int(configured) if configured else max(256, int(cfg.data.batch_size))


def _eval_forward(ctx: BenchContext, part: dict[str, Any]) -> Callable[[], float]:
    """Seconds per validation batch: the network's forward and cross-entropy in inference mode
    on one eval-sized batch (the validation step's work, without its metric updates)."""
    net: nn.Module = part["net"]
    eval_batch = _eval_batch(part["cfg"])
    generator = torch.Generator(device=ctx.device).manual_seed(1)
    x = torch.rand((eval_batch, 3, 32, 32), generator=generator, device=ctx.device)
    y = torch.randint(0, 10, (eval_batch,), generator=generator, device=ctx.device)
    if ctx.options.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> float:
        net.eval()
        start = ctx.clock.now()
        with torch.inference_mode(), ctx.autocast():
            F.cross_entropy(net(x), y)
        seconds = ctx.clock.now() - start
        net.train()
        return seconds

    return run


def _full_run(ctx: BenchContext, part: dict[str, Any]) -> float:
    """One whole seed run: 16 epochs × 50k CIFAR-shaped images with validation on 10k each
    epoch, checkpoints, CSV logging and metrics.csv as ``moe_lab.train`` writes them. Returns its
    wall time (the fit, setup included)."""
    cfg, workdir = part["cfg"], part["workdir"] / "full"
    dm = synthetic_cifar(ctx, cfg, CIFAR_TRAIN, CIFAR_TEST, workdir)
    lit: Classifier = part["lit"]
    lit.metrics_path = workdir / "metrics.csv"
    full_cfg = compose_protocol("cifar10", str(cfg.model.name), workdir)
    ctx.log(f"  e  full seed run of {cfg.model.name} ({cfg.trainer.max_epochs} epochs)...")
    with _quiet_lightning(silence_output=False):
        start = ctx.clock.now()
        trainer = trainer_for(
            ctx,
            workdir,
            cfg=full_cfg,
            max_epochs=int(cfg.trainer.max_epochs),
            enable_progress_bar=False,
        )
        trainer.fit(lit, datamodule=dm)
        return ctx.clock.now() - start


def _progress(row: dict[str, Any]) -> str:
    result = {True: "pass", False: "MISS", None: "n/a"}[row["pass"]]
    return (
        f"  {row['section']}  {row['name']}: {row['candidate_value']:,.0f} vs "
        f"{row['reference_value']:,.0f} img/s, ratio {row['ratio']:.3f} "
        f"({row['target']['text']}: {result})"
    )
