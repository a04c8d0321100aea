"""Noisy gating, the auxiliary losses, expert-usage statistics, the construction errors of the
routing keywords, the Lightning module's use of the losses and the experts presets. Expected
values are recomputed here from the logits by the published formulas."""

from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor, nn

from moe_lab.layers import AUX_LOSS_NAMES, Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE
from moe_lab.lit import Classifier

CONF = Path(__file__).resolve().parents[1] / "conf"


def cv2(x: Tensor) -> float:
    """Squared coefficient of variation of a 1D tensor (population variance)."""
    x = x.double()
    return (x.var(unbiased=False) / x.mean() ** 2).item() if x.mean() != 0 else 0.0


def one_hot_layer(top_k: int | None, n_rows: int = 8, k: int = 4, scale: float = 2.0):
    """A DenseMoE whose gate logits are ``scale * one_hot(i mod K)`` for row i."""
    layer = DenseMoE(k, 3, k, top_k=top_k, gating_activation="softmax").double()
    with torch.no_grad():
        layer.gating_kernel.copy_(scale * torch.eye(k))
        layer.gating_bias.zero_()
    x = torch.eye(k, dtype=torch.float64).repeat(n_rows // k, 1)
    return layer, x


# ---------------------------------------------------------------------------------------------
# Auxiliary losses on hand-made gates
# ---------------------------------------------------------------------------------------------


def test_balanced_top1_routing_gives_the_minimum_losses() -> None:
    layer, x = one_hot_layer(top_k=1)
    layer(x)
    losses = layer.aux_losses()
    assert set(losses) == set(AUX_LOSS_NAMES)
    assert all(v.dim() == 0 for v in losses.values())
    assert losses["importance"].item() == pytest.approx(0.0, abs=1e-12)
    assert losses["load"].item() == pytest.approx(0.0, abs=1e-12)
    assert losses["switch"].item() == pytest.approx(1.0)  # K * sum_k (1/K)(1/K)
    # z-loss: logsumexp of (2, 0, 0, 0) squared, the same for every row
    assert losses["z_loss"].item() == pytest.approx(math.log(math.exp(2) + 3) ** 2)


def test_everything_routed_to_one_expert_gives_the_maximum_losses() -> None:
    k, n = 4, 6
    layer = DenseMoE(3, 2, k, top_k=1).double()
    with torch.no_grad():
        layer.gating_kernel.zero_()
        layer.gating_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    layer(torch.randn(n, 3, dtype=torch.float64))
    losses = layer.aux_losses()
    p0 = math.exp(5) / (math.exp(5) + 3)
    assert losses["importance"].item() == pytest.approx(cv2(torch.tensor([n * p0, 0, 0, 0])))
    assert losses["importance"].item() == pytest.approx(k - 1)  # cv^2 of a one-hot vector
    assert losses["load"].item() == pytest.approx(k - 1)
    assert losses["switch"].item() == pytest.approx(k * 1.0 * p0)
    assert losses["z_loss"].item() == pytest.approx(math.log(math.exp(5) + 3) ** 2)


@pytest.mark.parametrize("top_k", [None, 2, 4])
def test_aux_losses_match_the_formulas_dense(top_k: int | None) -> None:
    torch.manual_seed(0)
    layer = DenseMoE(5, 3, 4, top_k=top_k, gating_activation="softmax",
                     gating_kernel_initializer_scale=4.0).double()  # fmt: skip
    x = torch.randn(9, 5, dtype=torch.float64)
    layer(x)
    logits = x @ layer.gating_kernel + layer.gating_bias  # (N, K)
    probs = torch.softmax(logits, -1)
    kept = 1 if top_k is None else top_k  # a dense mixture counts its largest gate
    top = logits.topk(kept, -1)
    if top_k in (None, 4):
        gates = probs
    else:
        gates = torch.zeros_like(probs).scatter(-1, top.indices, torch.softmax(top.values, -1))
    counts = torch.zeros(4, dtype=torch.float64)
    for row in top.indices:
        for e in row:
            counts[e] += 1
    f = counts / counts.sum()
    losses = layer.aux_losses()
    assert losses["importance"].item() == pytest.approx(cv2(gates.sum(0)))
    assert losses["load"].item() == pytest.approx(cv2(counts), rel=1e-9, abs=1e-12)
    assert losses["switch"].item() == pytest.approx(4 * (f * probs.mean(0)).sum().item())
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean().item()
    assert losses["z_loss"].item() == pytest.approx(expected_z)


def test_aux_losses_match_the_formulas_per_filter_conv() -> None:
    """Conv layers: each filter is a gate group; the losses are averaged over filters."""
    torch.manual_seed(0)
    out, k = 3, 4
    layer = Conv1dMoE(2, out, k, 3, None, gate_input="pooled", top_k=2,
                      gating_kernel_initializer_scale=4.0).double()  # fmt: skip
    x = torch.randn(5, 2, 7, dtype=torch.float64)
    layer(x)
    logits = torch.einsum("bc,cfk->bfk", x.mean(-1), layer.gating_kernel) + layer.gating_bias
    importance, load, switch = [], [], []
    for f in range(out):
        top = logits[:, f].topk(2, -1)
        gates = torch.zeros(5, k, dtype=torch.float64).scatter(
            -1, top.indices, torch.softmax(top.values, -1)
        )
        counts = torch.bincount(top.indices.reshape(-1), minlength=k).double()
        importance.append(cv2(gates.sum(0)))
        load.append(cv2(counts))
        mean_prob = torch.softmax(logits[:, f], -1).mean(0)
        switch.append(k * (counts / counts.sum() * mean_prob).sum().item())
    losses = layer.aux_losses()
    assert losses["importance"].item() == pytest.approx(sum(importance) / out)
    assert losses["load"].item() == pytest.approx(sum(load) / out)
    assert losses["switch"].item() == pytest.approx(sum(switch) / out)
    expected_z = (torch.logsumexp(logits, -1) ** 2).mean().item()
    assert losses["z_loss"].item() == pytest.approx(expected_z)


def test_aux_losses_are_differentiable() -> None:
    torch.manual_seed(0)
    layer = DenseMoE(5, 3, 4, top_k=1)
    layer(torch.randn(16, 5))
    losses = layer.aux_losses()
    for name in ("importance", "switch", "z_loss"):
        (grad,) = torch.autograd.grad(losses[name], layer.gating_kernel, retain_graph=True)
        assert grad.abs().sum() > 0, name
    assert not losses["load"].requires_grad  # counts: no gradient without noise


# ---------------------------------------------------------------------------------------------
# Noisy gating
# ---------------------------------------------------------------------------------------------


def test_noise_kernel_exists_only_with_noisy_gating_and_starts_at_zero() -> None:
    assert DenseMoE(4, 3, 2).noise_kernel is None
    dense = DenseMoE(4, 3, 2, noisy_gating=True)
    conv = Conv2dMoE(2, 3, 2, 3, (5, 5), noisy_gating=True)
    pooled = Conv2dMoE(2, 3, 2, 3, None, noisy_gating=True, gate_input="pooled")
    for layer in (dense, conv, pooled):
        assert layer.noise_kernel.shape == layer.gating_kernel.shape
        assert layer.noise_kernel.eq(0).all()
        assert "noise_kernel" in dict(layer.named_parameters())


@pytest.mark.parametrize("ndim", [0, 1, 2, 3])
def test_noisy_gating_is_deterministic_in_eval_and_random_in_training(ndim: int) -> None:
    torch.manual_seed(0)
    if ndim == 0:
        layer, x = DenseMoE(6, 4, 4, top_k=2, noisy_gating=True), torch.randn(8, 6)
    else:
        size = (5,) * ndim
        layer = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}[ndim](
            2, 3, 4, 3, size, top_k=2, noisy_gating=True, padding="same"
        )
        x = torch.randn(4, 2, *size)
    layer.eval()
    first = layer(x)
    torch.manual_seed(99)
    assert torch.equal(layer(x), first) and torch.isfinite(first).all()
    layer.train()
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    torch.manual_seed(2)
    c = layer(x)
    assert torch.equal(a, b)  # the noise comes from torch's RNG
    assert not torch.equal(a, c)
    assert not torch.equal(a, first)
    assert torch.isfinite(a).all()
    # the noise kernel learns from the task loss (the kept gates depend on the noisy logits)
    # and from the smooth load estimate
    load = layer.aux_losses()["load"]
    for loss in (c.square().sum(), load):
        (grad,) = torch.autograd.grad(loss, layer.noise_kernel, retain_graph=True)
        assert grad.abs().sum() > 0


def test_noisy_gates_and_smooth_load_match_the_formulas() -> None:
    """Noise std = softplus(x @ W_noise) + 0.01; load_i = sum over rows of
    Phi((clean_i - kth_largest_noisy_logit_of_the_others) / std_i) (Shazeer et al. 2017)."""
    torch.manual_seed(0)
    n, k, top_k = 7, 4, 2
    layer = DenseMoE(5, 3, k, top_k=top_k, noisy_gating=True).double().train()
    with torch.no_grad():
        layer.noise_kernel.normal_(0.0, 0.5)
    x = torch.randn(n, 5, dtype=torch.float64)
    torch.manual_seed(7)
    layer(x)
    torch.manual_seed(7)
    eps = torch.randn(n, 1, k, dtype=torch.float64)[:, 0]
    with torch.no_grad():
        clean = x @ layer.gating_kernel + layer.gating_bias
        std = F.softplus(x @ layer.noise_kernel) + 0.01
    noisy = clean + eps * std
    top = noisy.topk(top_k, -1)
    gates = torch.zeros_like(noisy).scatter(-1, top.indices, torch.softmax(top.values, -1))
    torch.testing.assert_close(layer.last_gates[:, 0], gates)

    normal = torch.distributions.Normal(0.0, 1.0)
    load = torch.zeros(k, dtype=torch.float64)
    for row in range(n):
        for i in range(k):
            others = torch.cat([noisy[row, :i], noisy[row, i + 1 :]])
            kth = others.sort(descending=True).values[top_k - 1]
            load[i] += normal.cdf((clean[row, i] - kth) / std[row, i])
    losses = layer.aux_losses()
    assert losses["load"].item() == pytest.approx(cv2(load))
    counts = torch.bincount(top.indices.reshape(-1), minlength=k).double()
    mean_prob = torch.softmax(noisy, -1).mean(0)
    assert losses["switch"].item() == pytest.approx(k * (counts / counts.sum() * mean_prob).sum())
    assert losses["importance"].item() == pytest.approx(cv2(gates.sum(0)))
    assert losses["z_loss"].item() == pytest.approx((torch.logsumexp(clean, -1) ** 2).mean())


def test_noise_is_added_to_dense_mixtures_too() -> None:
    torch.manual_seed(0)
    layer = DenseMoE(4, 3, 3, gating_activation="softmax", noisy_gating=True).double().train()
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(3)
    layer(x)
    torch.manual_seed(3)
    eps = torch.randn(5, 1, 3, dtype=torch.float64)[:, 0]
    logits = x @ layer.gating_kernel + layer.gating_bias + eps * (math.log(2) + 0.01)
    torch.testing.assert_close(layer.last_gates[:, 0], torch.softmax(logits, -1))


# ---------------------------------------------------------------------------------------------
# Expert-usage statistics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1, 2, 3])
def test_routing_stats_match_gates_counted_by_hand(top_k: int | None) -> None:
    torch.manual_seed(0)
    out, k, b = 2, 3, 6
    layer = Conv2dMoE(2, out, k, 3, (4, 4), top_k=top_k, gating_activation="softmax",
                      gating_kernel_initializer_scale=3.0).double()  # fmt: skip
    x = torch.randn(b, 2, 4, 4, dtype=torch.float64)
    layer(x)
    logits = (x.reshape(b, -1) @ layer.gating_kernel.reshape(-1, out * k)).view(b, out, k)
    logits = logits + layer.gating_bias
    importance = torch.zeros(k, dtype=torch.float64)
    load = torch.zeros(k, dtype=torch.float64)
    entropy = 0.0
    for s in range(b):
        for f in range(out):
            z = logits[s, f]
            if top_k is None or top_k == k:
                gates = torch.softmax(z, 0)
                routed = [int(z.argmax())] if top_k is None else list(range(k))
            else:
                routed = z.topk(top_k).indices.tolist()
                kept = torch.softmax(z, 0)[routed] if top_k == 1 else torch.softmax(z[routed], 0)
                gates = torch.zeros(k, dtype=torch.float64)
                gates[routed] = kept
            importance += gates
            for e in routed:
                load[e] += 1
            p = gates / gates.sum()
            entropy -= sum(v * math.log(v) for v in p.tolist() if v > 0)
    stats = layer.routing_stats()
    pairs = b * out
    torch.testing.assert_close(stats["importance"].double(), importance / pairs)
    torch.testing.assert_close(stats["load"].double(), load / pairs)
    assert stats["entropy"].item() == pytest.approx(entropy / pairs, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Construction errors
# ---------------------------------------------------------------------------------------------

ERRORS = {
    "top_k_zero": (lambda: DenseMoE(4, 3, 4, top_k=0), ("top_k", "[1, n_experts=4]", "got 0")),
    "top_k_above_n_experts": (
        lambda: Conv2dMoE(2, 3, 4, 3, (5, 5), top_k=5),
        ("top_k", "[1, n_experts=4]", "got 5"),
    ),
    "top_k_float": (lambda: Conv1dMoE(2, 3, 4, 3, 5, top_k=1.5), ("top_k", "got 1.5")),
    "top_k_bool": (lambda: DenseMoE(4, 3, 4, top_k=True), ("top_k", "got True")),
    "top_k_with_sigmoid_gates": (
        lambda: DenseMoE(4, 3, 4, top_k=2, gating_activation="sigmoid"),
        ("top_k=2 needs softmax gates", "gating_activation='sigmoid'"),
    ),
    "top_k_with_expert_softmax": (
        lambda: DenseMoE(4, 3, 4, top_k=2, expert_activation="softmax"),
        ("expert_activation='softmax'", "top_k=2"),
    ),
    "kernel_mix_with_relu_experts": (
        lambda: Conv2dMoE(
            2, 3, 2, 3, (5, 5), expert_activation="relu", expert_backend="kernel_mix"
        ),
        ("expert_backend='kernel_mix'", "linear experts", "expert_activation='relu'"),
    ),
    "kernel_mix_with_relu_experts_dense": (
        lambda: DenseMoE(4, 3, 2, expert_activation="relu", expert_backend="kernel_mix"),
        ("expert_backend='kernel_mix'", "expert_activation='relu'"),
    ),
    "unknown_backend": (
        lambda: Conv1dMoE(2, 3, 2, 3, 5, expert_backend="fast"),
        ("expert_backend must be", "'channels'", "'kernel_mix'", "got 'fast'"),
    ),
    "unknown_gate_input": (
        lambda: Conv3dMoE(2, 3, 2, 3, (4, 4, 4), gate_input="avg"),
        ("gate_input must be", "'full'", "'pooled'", "got 'avg'"),
    ),
    "input_size_none_with_full_gates": (
        lambda: Conv2dMoE(2, 3, 2, 3, None),
        ("needs input_size with gate_input='full'", "gate_input='pooled'"),
    ),
    "noisy_gating_not_bool": (
        lambda: DenseMoE(4, 3, 2, noisy_gating="yes"),
        ("noisy_gating must be True or False", "'yes'"),
    ),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_routing_keyword_errors(name: str) -> None:
    build, fragments = ERRORS[name]
    with pytest.raises(ValueError) as info:
        build()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_full_gates_reject_other_resolutions_with_a_hint() -> None:
    layer = Conv2dMoE(2, 3, 2, 3, (6, 6), top_k=1)
    with pytest.raises(ValueError, match=r"expected spatial size \(6, 6\).*gate_input='pooled'"):
        layer(torch.randn(1, 2, 7, 6))


def test_top_k_defaults_the_gate_to_softmax() -> None:
    layer = DenseMoE(4, 3, 4, top_k=2)
    assert layer.gating_activation.is_softmax
    assert "top_k=2" in repr(layer)


# ---------------------------------------------------------------------------------------------
# The Lightning module and the experts presets
# ---------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self, **moe_kwargs) -> None:
        super().__init__()
        self.moe = DenseMoE(6, 5, 4, expert_activation="relu", **moe_kwargs)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.moe(x))


def make_module(net: nn.Module, **kwargs) -> Classifier:
    return Classifier(
        net, num_classes=3, optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs
    )


def test_lightning_loss_adds_the_weighted_aux_losses() -> None:
    torch.manual_seed(0)
    net = TinyNet(top_k=2)
    weights = {"importance": 0.3, "load": 0.0, "switch": 0.5, "z_loss": 0.1}
    module = make_module(net, aux_loss_weights=weights)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = module.training_step((x, y), 0)
    ce = F.cross_entropy(net(x), y)
    aux = net.moe.aux_losses()
    expected = ce + 0.3 * aux["importance"] + 0.5 * aux["switch"] + 0.1 * aux["z_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert net.moe.gating_kernel.grad.abs().sum() > 0


def test_lightning_rejects_unknown_aux_loss_names() -> None:
    with pytest.raises(ValueError, match=r"unknown auxiliary losses \['balance'\]"):
        make_module(TinyNet(top_k=1), aux_loss_weights={"balance": 0.1})


def test_aux_losses_read_nothing_back_to_the_host(monkeypatch) -> None:
    """The loss terms stay on the device (the dense mixture path: sparse dispatch itself reads
    the per-expert row counts, by design)."""
    torch.manual_seed(0)
    module = make_module(TinyNet(noisy_gating=True, gating_activation="softmax"),
                         aux_loss_weights=dict.fromkeys(AUX_LOSS_NAMES, 0.1))  # fmt: skip

    def host_read(*args, **kwargs):
        raise AssertionError("host sync inside the training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    loss = module.training_step((torch.randn(8, 6), torch.randint(0, 3, (8,))), 0)
    monkeypatch.undo()
    assert torch.isfinite(loss)


ROUTING_PRESETS = ["top1_of_4", "top2_of_4", "top2_of_8", "top1_of_16", "noisy_top2_of_8"]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conf")
    for group in ("model", "experts", "activation"):
        shutil.copytree(CONF / group, root / group)
    (root / "config.yaml").write_text(
        "defaults:\n  - model: moe\n  - experts: k2\n  - activation: relu_softmax\n  - _self_\n"
        "data:\n  topology:\n    blocks:\n"
        "      - {channels: [4, 4], kernel_size: 3, padding: [same, valid], pool: 2, dropout: 0.0}\n"
        "    dense_units: 8\n    dense_dropout: 0.0\n"
    )
    return root


@pytest.mark.parametrize("preset", ROUTING_PRESETS)
def test_routing_presets_build_and_train_conv_and_dense_layers(config_dir: Path, preset: str):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experts={preset}"])
    # the preset as composed (it extends conf/experts/_top_k.yaml, which extends _base.yaml)
    raw = cfg.experts
    assert set(raw.moe_kwargs) == {"top_k", "noisy_gating", "gate_input", "expert_backend"}
    assert set(raw.aux_loss_weights) == set(AUX_LOSS_NAMES)
    assert raw.aux_loss_weights.switch > 0 or raw.aux_loss_weights.load > 0  # balancing on
    model, _ = instantiate(cfg.model)(input_shape=(1, 8, 8), num_classes=10)
    layers = model.moe_layers()
    assert {type(m).__name__ for m in layers.values()} == {"Conv2dMoE", "DenseMoE"}
    for layer in layers.values():
        assert (layer.n_experts, layer.top_k) == (raw.n_experts, raw.moe_kwargs.top_k)
        assert layer.noisy_gating == raw.moe_kwargs.noisy_gating
    module = make_module(model, aux_loss_weights=dict(cfg.experts.aux_loss_weights))
    module.num_classes = 10
    loss = module.training_step((torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))), 0)
    loss.backward()
    for layer in layers.values():
        assert layer.gating_kernel.grad.abs().sum() > 0
        assert layer.routing_stats()["load"].sum().item() == pytest.approx(raw.moe_kwargs.top_k)


@pytest.mark.parametrize("top_k", [2, 3])
def test_z_loss_matches_st_moe_pytorch(top_k: int) -> None:
    """The router z-loss (ST-MoE, Zoph et al. 2022) against lucidrains' st-moe-pytorch: its
    ``TopNGating`` with this layer's gate weights gives the same loss and the same gradient."""
    st_moe = pytest.importorskip("st_moe_pytorch.st_moe_pytorch")
    torch.manual_seed(0)
    layer = DenseMoE(6, 5, 4, top_k=top_k, use_gating_bias=False)
    with torch.no_grad():
        layer.gating_kernel.normal_(0.0, 2.0)  # logits of a few units: the loss is not small
    peer = st_moe.TopNGating(6, num_gates=4, top_n=top_k)
    with torch.no_grad():
        peer.to_gates.weight.copy_(layer.gating_kernel.t())
    x = torch.randn(13, 6)
    layer.train(), peer.train()
    layer(x)
    ours = layer.aux_losses()["z_loss"]
    theirs = peer(x.unsqueeze(0))[3]  # (batch=1, sequence=13, dim): the z-loss over 13 tokens
    torch.testing.assert_close(ours, theirs.reshape(()))
    (grad_ours,) = torch.autograd.grad(ours, layer.gating_kernel)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), peer.to_gates.weight)
    torch.testing.assert_close(grad_ours, grad_theirs.t())
