"""The Lightning module: losses, constraints, the Keras decay, and no host sync in a step."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
from torch import nn

from moe_lab.layers import DenseMoE
from moe_lab.lit import Classifier, InverseTimeDecay, keras_decay


class TinyMoENet(nn.Module):
    def __init__(self, **moe_kwargs) -> None:
        super().__init__()
        self.moe = DenseMoE(
            6, 5, 3, expert_activation="relu", gating_activation="softmax", **moe_kwargs
        )
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.moe(x))


def make_module(net: nn.Module, **kwargs) -> Classifier:
    return Classifier(
        net, num_classes=4, optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs
    )


def test_keras_decay_is_lr_over_one_plus_decay_t() -> None:
    param = nn.Parameter(torch.zeros(()))
    opt = torch.optim.RMSprop([param], lr=1e-2, alpha=0.9)
    sched = keras_decay(opt, decay=0.5)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-2 / (1 + 0.5 * t) for t in range(4)])
    with pytest.raises(ValueError, match="decay must be >= 0"):
        InverseTimeDecay(-1.0)


def test_loss_adds_the_layers_regularization() -> None:
    torch.manual_seed(0)
    net = TinyMoENet(expert_kernel_regularizer={"l2": 0.5}, activity_regularizer="l1")
    module = make_module(net)
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    loss = module.training_step((x, y), 0)
    logits = net(x)
    expected = (
        nn.functional.cross_entropy(logits, y)
        + 0.5 * net.moe.expert_kernel.square().sum()
        + 0.01 * net.moe(x).abs().sum()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_constraints_are_applied_after_each_optimizer_step(tmp_path) -> None:
    torch.manual_seed(0)
    net = TinyMoENet(expert_kernel_constraint={"name": "max_norm", "max_value": 0.1})
    module = make_module(net)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6) * 10, torch.randint(0, 4, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")  # fmt: skip
    trainer.fit(module, loader, loader)
    norms = net.moe.expert_kernel.detach().square().sum(0).sqrt()  # fan-in norm of each unit
    assert norms.max() <= 0.1 + 1e-6


def test_training_step_never_reads_values_back_to_the_host(monkeypatch) -> None:
    torch.manual_seed(0)
    module = make_module(TinyMoENet(expert_kernel_regularizer="l2"))
    batch = (torch.randn(8, 6), torch.randint(0, 4, (8,)))

    def host_read(*args, **kwargs):
        raise AssertionError("host sync inside the training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss = module.training_step(batch, 0)
    monkeypatch.undo()
    assert torch.isfinite(loss)


def test_gate_statistics_are_means_over_the_validation_set() -> None:
    torch.manual_seed(0)
    net = TinyMoENet()
    module = make_module(net)
    batches = [torch.randn(5, 6), torch.randn(3, 6)]
    gates = []
    for x in batches:
        net(x)
        module._accumulate_gate_stats(x.shape[0])
        gates.append(net.moe.last_gates.detach().reshape(x.shape[0], -1))
    all_gates = torch.cat(gates)

    class FakeStrategy:
        def reduce(self, tensor, reduce_op):
            return tensor

    class FakeTrainer:
        strategy = FakeStrategy()

    module._trainer = FakeTrainer()
    stats = module._gate_epoch_stats()
    for k in range(3):
        assert stats[f"gate/moe/importance_{k}"] == pytest.approx(
            all_gates[:, k].mean().item(), rel=1e-5
        )
        assert stats[f"gate/moe/load_{k}"] == pytest.approx(
            (all_gates.argmax(1) == k).float().mean().item()
        )
    entropy = -(all_gates * all_gates.log()).sum(1).mean().item()
    assert stats["gate/moe/entropy"] == pytest.approx(entropy, rel=1e-5)
