"""The variant keywords of the MoE layers (the "twin" issue): ``gate_groups``, ``gate_hidden``,
``gate_temperature``, ``balance="aux_free"``, ``capacity_factor``, ``n_shared_experts`` and the
``dead`` / ``dropped`` statistics. Each path is checked against an explicit loop over its
formula (float64, tiny shapes), written from the docstrings, not from the implementation."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE, load_keras_weights

CONV = {1: Conv1dMoE, 2: Conv2dMoE, 3: Conv3dMoE}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SIZE = {1: (7,), 2: (5, 4), 3: (4, 3, 3)}
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# References: the formulas, one (sample, gate group) or (sample, filter, expert) at a time
# ---------------------------------------------------------------------------------------------


def ref_logits(layer, feats: torch.Tensor) -> torch.Tensor:
    """``feats (B, F)`` -> logits / tau ``(B, G, K)``, through the optional hidden ReLU layer."""
    h = feats
    if layer.gating_hidden_kernel is not None:
        h = h @ layer.gating_hidden_kernel.reshape(h.shape[1], -1)
        if layer.gating_hidden_bias is not None:
            h = h + layer.gating_hidden_bias
        h = torch.relu(h)
    z = h @ layer.gating_kernel.reshape(h.shape[1], -1)
    if layer.gating_bias is not None:
        z = z + layer.gating_bias.reshape(-1)
    return z.reshape(feats.shape[0], -1, layer.n_experts) / layer.gate_temperature


def ref_gates(layer, feats: torch.Tensor) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """Dense gates ``(B, G, K)`` (0 where not kept) and each pair's kept experts, in the order
    of their (balance-biased) logits, highest first."""
    z = ref_logits(layer, feats)
    n, groups, k_all = z.shape
    bias = layer.balance_bias if layer.balance is not None else torch.zeros(groups, k_all)
    gates = torch.zeros_like(z)
    chosen: list[list[list[int]]] = []
    for b in range(n):
        chosen.append([])
        for g in range(groups):
            row = z[b, g]
            if layer.top_k is None:
                gates[b, g] = torch.softmax(row, 0)
                chosen[b].append(list(range(k_all)))
                continue
            score = [(row[e] + bias[g, e]).item() for e in range(k_all)]
            keep = sorted(range(k_all), key=lambda e: -score[e])[: layer.top_k]
            chosen[b].append(keep)
            if layer.top_k == 1:
                gates[b, g, keep[0]] = torch.softmax(row, 0)[keep[0]]
            else:
                gates[b, g, keep] = torch.softmax(row[keep], 0)
    return gates, chosen


def ref_capacity(gates: torch.Tensor, chosen, factor: float, k: int) -> tuple[torch.Tensor, int]:
    """The documented capacity rule: per gate group, assignments in order of gate (highest
    first), ties by sample then slot; an expert keeps its first ceil(cf * N * k / K)."""
    n, groups, k_all = gates.shape
    cap = min(n, math.ceil(factor * n * k / k_all))
    out = gates.clone()
    dropped = 0
    for g in range(groups):
        queue = [
            (-gates[b, g, e].item(), b, j, e) for b in range(n) for j, e in enumerate(chosen[b][g])
        ]
        taken = [0] * k_all
        for _, b, _, e in sorted(queue):
            if taken[e] < cap:
                taken[e] += 1
            else:
                out[b, g, e] = 0.0
                dropped += 1
    return out, dropped


def conv_features(layer, x: torch.Tensor) -> torch.Tensor:
    if layer.gate_input == "pooled":
        return x.mean(dim=tuple(range(2, x.dim())))
    return x.reshape(x.shape[0], -1)


def act_of(layer):
    return torch.relu if layer.expert_activation.name == "relu" else (lambda t: t)


def ref_conv(layer, x: torch.Tensor, gates: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """``y[b, f] = sum_k gates[b, f // (out / G), k] * act(conv_{f,k}(x[b]) + c[f, k])
    + sum_s act(conv_{f,s}^shared(x[b]) + c^shared[f, s])``, one kernel at a time."""
    conv, act = CONV_FN[layer.ndim], act_of(layer)
    n, out, k_all = x.shape[0], layer.out_channels, layer.n_experts
    per = out // gates.shape[1]
    shared = layer.n_shared_experts
    rows = []
    for b in range(n):
        xb = x[b : b + 1]
        filters = []
        for f in range(out):
            acc = 0.0
            for k in range(k_all):
                h = conv(xb, layer.expert_kernel[f * k_all + k][None], padding=padding)[0, 0]
                if layer.expert_bias is not None:
                    h = h + layer.expert_bias[f, k]
                acc = acc + gates[b, f // per, k] * act(h)
            for s in range(shared):
                h = conv(xb, layer.shared_expert_kernel[f * shared + s][None], padding=padding)
                if layer.shared_expert_bias is not None:
                    h = h + layer.shared_expert_bias[f, s]
                acc = acc + act(h[0, 0])
            filters.append(acc)
        rows.append(torch.stack(filters))
    return torch.stack(rows)


def ref_dense(layer, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``y[n] = sum_k gates[n, 0, k] act(x[n] W_k + c_k) + sum_s act(x[n] W^s_s + c^s_s)``."""
    act = act_of(layer)
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros(layer.out_features, dtype=x.dtype)
        for k in range(layer.n_experts):
            h = x[n] @ layer.expert_kernel[:, :, k]
            if layer.expert_bias is not None:
                h = h + layer.expert_bias[:, k]
            acc = acc + gates[n, 0, k] * act(h)
        for s in range(layer.n_shared_experts):
            h = x[n] @ layer.shared_expert_kernel[:, :, s]
            if layer.shared_expert_bias is not None:
                h = h + layer.shared_expert_bias[:, s]
            acc = acc + act(h)
        rows.append(acc)
    return torch.stack(rows)


def randomize(layer) -> None:
    """Nonzero biases everywhere (the initializers start them at zero)."""
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)


def conv_layer(ndim, *, backend="channels", top_k=None, double=True, **kw):
    act = "relu" if backend == "channels" else None
    layer = CONV[ndim](
        2, 4, 3, 3, SIZE[ndim], expert_backend=backend, expert_activation=act,
        gating_activation="softmax", top_k=top_k, **kw,
    )  # fmt: skip
    layer = layer.double() if double else layer
    randomize(layer)
    return layer


# ---------------------------------------------------------------------------------------------
# gate_groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("groups", [None, 1, 2])
@pytest.mark.parametrize("backend", ["channels", "kernel_mix"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_gate_groups_match_the_loop(ndim, groups, backend, top_k) -> None:
    torch.manual_seed(ndim)
    layer = conv_layer(ndim, backend=backend, top_k=top_k, gate_groups=groups)
    g = 4 if groups is None else groups
    assert layer.gating_kernel.shape == (2, *SIZE[ndim], g, 3)
    assert layer.gating_bias.shape == (g, 3)
    x = torch.randn(3, 2, *SIZE[ndim], dtype=F64)
    y = layer(x)
    gates, _ = ref_gates(layer, conv_features(layer, x))
    torch.testing.assert_close(y, ref_conv(layer, x, gates))
    assert layer.last_gates.shape == (3, g, 3)
    torch.testing.assert_close(layer.last_gates, gates)


@pytest.mark.parametrize("backend", ["channels", "kernel_mix"])
def test_gate_groups_conv3d_and_pooled_gates(backend) -> None:
    torch.manual_seed(3)
    layer = conv_layer(3, backend=backend, gate_groups=1, gate_input="pooled")
    assert layer.gating_kernel.shape == (2, 1, 3)
    x = torch.randn(2, 2, *SIZE[3], dtype=F64)
    gates, _ = ref_gates(layer, conv_features(layer, x))
    torch.testing.assert_close(layer(x), ref_conv(layer, x, gates))


def test_gate_groups_one_kernel_mix_is_one_gemm(monkeypatch) -> None:
    """gate_groups=1: all filters' kernels are mixed by one (B, K) @ (K, out * W) product."""
    from moe_lab.layers import dispatch

    seen = []
    original = dispatch._MixAllKernels.apply

    def spy(gates, kernels, buffer):
        seen.append((tuple(gates.shape), tuple(kernels.shape)))
        return original(gates, kernels, buffer)

    monkeypatch.setattr(dispatch._MixAllKernels, "apply", spy)
    layer = conv_layer(2, backend="kernel_mix", gate_groups=1)
    layer(torch.randn(3, 2, 5, 4, dtype=F64))
    assert seen == [((3, 1, 3), (1, 3, 4 * 2 * 9))]


def test_gate_groups_errors_and_dense() -> None:
    with pytest.raises(ValueError, match="gate_groups=3 must divide out_channels=4"):
        Conv2dMoE(2, 4, 3, 3, (5, 5), gate_groups=3)
    for bad in (0, -1, True, 1.0, "2"):
        with pytest.raises(ValueError, match="gate_groups must be None"):
            Conv2dMoE(2, 4, 3, 3, (5, 5), gate_groups=bad)
    with pytest.raises(ValueError, match="gate_groups must be None or 1"):
        DenseMoE(4, 3, 2, gate_groups=2)
    torch.manual_seed(0)
    one = DenseMoE(4, 3, 2, gate_groups=1)
    torch.manual_seed(0)
    none = DenseMoE(4, 3, 2)
    x = torch.randn(5, 4)
    assert torch.equal(one(x), none(x))
    assert "gate_groups=1" in repr(one) and "gate_groups" not in repr(none)


# ---------------------------------------------------------------------------------------------
# gate_hidden
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("gate_bias", [True, False])
def test_gate_hidden_dense_matches_the_loop(top_k, gate_bias) -> None:
    torch.manual_seed(1)
    layer = DenseMoE(
        4, 3, 3, gate_hidden=5, top_k=top_k, expert_activation="relu",
        gating_activation="softmax", use_gating_bias=gate_bias, noisy_gating=True,
    ).double()  # fmt: skip
    randomize(layer)
    assert layer.gating_hidden_kernel.shape == (4, 5)
    assert layer.gating_kernel.shape == layer.noise_kernel.shape == (5, 3)
    assert (layer.gating_hidden_bias is None) != gate_bias
    layer.eval()  # no noise
    x = torch.randn(6, 4, dtype=F64)
    gates, _ = ref_gates(layer, x)
    torch.testing.assert_close(layer(x), ref_dense(layer, x, gates))
    assert "gate_hidden=5" in repr(layer)


@pytest.mark.parametrize("gate_input", ["full", "pooled"])
def test_gate_hidden_conv_matches_the_loop(gate_input) -> None:
    torch.manual_seed(2)
    layer = conv_layer(2, gate_hidden=6, gate_input=gate_input, gate_groups=2)
    lead = (2, 5, 4) if gate_input == "full" else (2,)
    assert layer.gating_hidden_kernel.shape == (*lead, 6)
    assert layer.gating_hidden_bias.shape == (6,)
    assert layer.gating_kernel.shape == (6, 2, 3)
    x = torch.randn(3, 2, 5, 4, dtype=F64)
    gates, _ = ref_gates(layer, conv_features(layer, x))
    torch.testing.assert_close(layer(x), ref_conv(layer, x, gates))
    # channels_last conversion leaves the (C, H, W, hidden) kernel's layout alone
    layer.to(memory_format=torch.channels_last)
    assert layer.gating_hidden_kernel.is_contiguous()


def test_gate_hidden_init() -> None:
    """Hidden layer He-initialised for its ReLU (conv: normal std sqrt(2 / fan_in); dense:
    uniform in +-sqrt(6 / in)), hidden bias zero, output layer at the original's rule with
    fan-in H; reset_parameters redraws them."""
    torch.manual_seed(0)
    conv = Conv2dMoE(64, 2, 2, 1, None, gate_input="pooled", gate_hidden=256)
    assert conv.gating_hidden_kernel.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert conv.gating_kernel.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.15)
    assert torch.count_nonzero(conv.gating_hidden_bias) == 0
    dense = DenseMoE(50, 3, 2, gate_hidden=400)
    bound = math.sqrt(6 / 50)
    assert dense.gating_hidden_kernel.abs().max().item() <= bound
    assert dense.gating_hidden_kernel.abs().max().item() > 0.95 * bound
    before = conv.gating_hidden_kernel.detach().clone()
    with torch.no_grad():
        conv.gating_hidden_bias.fill_(1.0)
    conv.reset_parameters()
    assert not torch.equal(before, conv.gating_hidden_kernel)
    assert torch.count_nonzero(conv.gating_hidden_bias) == 0


def test_gate_hidden_errors() -> None:
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="gate_hidden must be None"):
            DenseMoE(4, 3, 2, gate_hidden=bad)


# ---------------------------------------------------------------------------------------------
# gate_temperature
# ---------------------------------------------------------------------------------------------


def test_gate_temperature_divides_the_logits_and_can_change() -> None:
    torch.manual_seed(4)
    layer = DenseMoE(4, 3, 3, gating_activation="softmax", gate_temperature=2.0).double()
    randomize(layer)
    x = torch.randn(5, 4, dtype=F64)
    z = x @ layer.gating_kernel + layer.gating_bias
    layer(x)
    torch.testing.assert_close(layer.last_gates[:, 0], torch.softmax(z / 2.0, -1))
    layer.gate_temperature = 0.25  # as a schedule would, between steps
    y = layer(x)
    torch.testing.assert_close(layer.last_gates[:, 0], torch.softmax(z / 0.25, -1))
    gates, _ = ref_gates(layer, x)
    torch.testing.assert_close(y, ref_dense(layer, x, gates))
    assert "gate_temperature=0.25" in repr(layer)
    layer.gate_temperature = 1e9  # (near-)uniform gates
    layer(x)
    torch.testing.assert_close(layer.last_gates, torch.full((5, 1, 3), 1 / 3, dtype=F64))


def test_gate_temperature_top_k_and_conv() -> None:
    torch.manual_seed(5)
    layer = conv_layer(1, top_k=2, gate_temperature=0.5, gate_groups=2)
    x = torch.randn(3, 2, 7, dtype=F64)
    gates, _ = ref_gates(layer, conv_features(layer, x))
    torch.testing.assert_close(layer(x), ref_conv(layer, x, gates))


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "warm", None, True])
def test_gate_temperature_must_be_positive(bad) -> None:
    with pytest.raises(ValueError, match="gate_temperature must be a finite number > 0"):
        DenseMoE(4, 3, 2, gate_temperature=bad)
    layer = DenseMoE(4, 3, 2)
    with pytest.raises(ValueError, match="gate_temperature"):
        layer.gate_temperature = bad
    assert layer.gate_temperature == 1.0


# ---------------------------------------------------------------------------------------------
# balance="aux_free"
# ---------------------------------------------------------------------------------------------


def skewed_dense(rate: float = 0.05, top_k: int = 1) -> DenseMoE:
    torch.manual_seed(6)
    layer = DenseMoE(
        4, 3, 4, top_k=top_k, balance="aux_free", balance_rate=rate,
        gating_kernel_initializer_scale=0.01,
    ).double()  # fmt: skip
    with torch.no_grad():
        layer.gating_bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # expert 0 dominates
    return layer


def test_aux_free_balance_evens_the_load() -> None:
    layer = skewed_dense()
    assert layer.balance_bias.shape == (1, 4) and torch.count_nonzero(layer.balance_bias) == 0
    x = torch.randn(64, 4, dtype=F64)

    def imbalance() -> float:
        load = layer.routing_stats()["load"]
        return (load.max() / load.mean()).item()

    layer(x)
    first = imbalance()
    assert first == pytest.approx(4.0)  # everything on expert 0
    # the update, by hand: b += rate * sign(mean(load) - load)
    torch.testing.assert_close(
        layer.balance_bias, torch.tensor([[-0.05, 0.05, 0.05, 0.05]], dtype=F64)
    )
    for _ in range(150):
        layer(x)
    assert imbalance() < 1.6 < first
    assert layer.balance_bias[0, 0] < 0 < layer.balance_bias[0, 1:].min()


def test_aux_free_gates_are_the_unbiased_softmax_of_the_chosen() -> None:
    for top_k in (1, 2):
        layer = skewed_dense(top_k=top_k).eval()
        with torch.no_grad():
            layer.balance_bias.copy_(torch.tensor([[-10.0, 0.0, 10.0, 0.0]]))
        x = torch.randn(6, 4, dtype=F64)
        y = layer(x)
        z = x @ layer.gating_kernel + layer.gating_bias  # unbiased logits
        for n in range(6):
            chosen = (z[n] + layer.balance_bias[0]).topk(top_k).indices
            assert 2 in chosen.tolist() and 0 not in chosen.tolist()  # the bias chose
            if top_k == 1:
                expected = torch.softmax(z[n], 0)[chosen]
            else:
                expected = torch.softmax(z[n, chosen], 0)
            torch.testing.assert_close(layer.last_gates[n, 0, chosen], expected)
        gates, _ = ref_gates(layer, x)
        torch.testing.assert_close(y, ref_dense(layer, x, gates))


def test_aux_free_updates_only_in_training_forwards_and_is_saved() -> None:
    layer = skewed_dense()
    x = torch.randn(8, 4, dtype=F64)
    layer.eval()
    layer(x)
    assert torch.count_nonzero(layer.balance_bias) == 0
    layer.train()
    with torch.no_grad():
        layer(x)
    assert torch.count_nonzero(layer.balance_bias) == 0
    layer(x)
    assert torch.count_nonzero(layer.balance_bias) == 4
    state = layer.state_dict()
    assert "balance_bias" in state
    fresh = skewed_dense()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.balance_bias, layer.balance_bias)
    restored = pickle.loads(pickle.dumps(layer))
    assert torch.equal(restored.balance_bias, layer.balance_bias)
    assert "balance='aux_free', balance_rate=0.05" in repr(layer)
    assert "balance_bias" not in DenseMoE(4, 3, 4, top_k=1).state_dict()
    # low-precision casts leave the bias' small steps alone; float64 and device moves apply
    steps = layer.balance_bias.clone()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.balance_bias, steps) and steps.dtype == F64
    assert layer.expert_kernel.dtype == torch.bfloat16
    single = DenseMoE(4, 3, 4, top_k=1, balance="aux_free")
    assert single.balance_bias.dtype == torch.float32
    assert single.half().balance_bias.dtype == torch.float32
    assert single.double().balance_bias.dtype == F64


def test_aux_free_conv_groups() -> None:
    torch.manual_seed(7)
    layer = conv_layer(2, top_k=1, gate_groups=2, balance="aux_free", balance_rate=0.5)
    assert layer.balance_bias.shape == (2, 3)
    x = torch.randn(4, 2, 5, 4, dtype=F64)
    layer(x)
    counts = torch.zeros(2, 3, dtype=F64)
    for n in range(4):
        for g in range(2):
            counts[g, layer.last_gates[n, g].argmax()] += 1
    expected = 0.5 * torch.sign(counts.mean(-1, keepdim=True) - counts)
    torch.testing.assert_close(layer.balance_bias, expected)
    gates, _ = ref_gates(layer.eval(), conv_features(layer, x))  # with the updated bias
    torch.testing.assert_close(layer(x), ref_conv(layer, x, gates))


def test_balance_errors() -> None:
    with pytest.raises(ValueError, match=r"balance='aux_free'.*top_k=None"):
        DenseMoE(4, 3, 2, balance="aux_free")
    with pytest.raises(ValueError, match="balance must be None or 'aux_free'"):
        DenseMoE(4, 3, 2, top_k=1, balance="loss")
    with pytest.raises(ValueError, match="balance_rate must be a finite number >= 0"):
        DenseMoE(4, 3, 2, top_k=1, balance="aux_free", balance_rate=-1e-3)


# ---------------------------------------------------------------------------------------------
# capacity_factor
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("top_k", "factor"), [(1, 0.5), (2, 0.6), (2, 1.0), (3, 0.5)])
def test_capacity_dense_matches_the_loop(top_k, factor) -> None:
    torch.manual_seed(8)
    layer = DenseMoE(
        4, 3, 3, top_k=top_k, capacity_factor=factor, expert_activation="relu",
        n_shared_experts=1,
    ).double()  # fmt: skip
    randomize(layer)
    x = torch.randn(10, 4, dtype=F64)
    y = layer(x)
    gates, chosen = ref_gates(layer, x)
    gates, dropped = ref_capacity(gates, chosen, factor, top_k)
    torch.testing.assert_close(y, ref_dense(layer, x, gates))
    torch.testing.assert_close(layer.last_gates, gates)
    stats = layer.routing_stats()
    assert stats["dropped"].item() == pytest.approx(dropped / (10 * top_k))
    if factor < 1:
        assert dropped > 0


@pytest.mark.parametrize("backend", ["channels", "kernel_mix"])
def test_capacity_conv_matches_the_loop(backend) -> None:
    torch.manual_seed(9)
    layer = conv_layer(2, backend=backend, top_k=2, gate_groups=2, capacity_factor=0.5)
    x = torch.randn(5, 2, 5, 4, dtype=F64)
    y = layer(x)
    gates, chosen = ref_gates(layer, conv_features(layer, x))
    gates, dropped = ref_capacity(gates, chosen, 0.5, 2)
    torch.testing.assert_close(y, ref_conv(layer, x, gates))
    assert layer.routing_stats()["dropped"].item() == pytest.approx(dropped / (5 * 2 * 2))


def test_capacity_ties_go_in_sample_order() -> None:
    """Equal gates (every sample routed alike): the first ceil(cf * N * k / K) samples stay."""
    layer = DenseMoE(3, 2, 4, top_k=1, capacity_factor=1.0).double()
    with torch.no_grad():
        layer.gating_kernel.zero_()
        layer.gating_bias.copy_(torch.tensor([0.0, 2.0, 0.0, 0.0]))
    x = torch.randn(10, 3, dtype=F64)
    layer(x)
    kept = layer.last_gates[:, 0, 1] > 0
    assert kept.tolist() == [True] * 3 + [False] * 7  # ceil(10 / 4) = 3
    assert layer.routing_stats()["dropped"].item() == pytest.approx(0.7)


def test_capacity_errors() -> None:
    for bad in (0, -0.5, math.nan, "big"):
        with pytest.raises(ValueError, match="capacity_factor must be"):
            DenseMoE(4, 3, 2, top_k=1, capacity_factor=bad)
    with pytest.raises(ValueError, match=r"capacity_factor.*top_k=None"):
        DenseMoE(4, 3, 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match=r"capacity_factor.*softmax"):
        DenseMoE(4, 3, 2, top_k=2, capacity_factor=1.0, expert_activation="softmax")


@pytest.mark.slow  # compiling takes 30-60 s on 2 busy CPU cores
def test_capacity_compiles_with_fullgraph() -> None:
    torch.manual_seed(10)
    dense = DenseMoE(
        4, 3, 4, top_k=2, capacity_factor=0.75, expert_activation="relu", balance="aux_free"
    ).eval()
    conv = Conv2dMoE(
        2, 4, 3, 3, (5, 5), top_k=2, capacity_factor=0.75, gate_groups=2, padding="same",
        expert_backend="kernel_mix",
    ).eval()  # fmt: skip
    cond = Conv2dMoE(2, 4, 3, 3, None, gate_input="pooled", gate_groups=1,
                     expert_backend="kernel_mix").eval()  # fmt: skip
    cases = [(dense, torch.randn(9, 4)), (conv, torch.randn(6, 2, 5, 5))]
    for layer, x in [*cases, (cond, torch.randn(5, 2, 6, 6))]:
        expected = layer(x)
        dropped = layer.routing_stats()["dropped"]
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(layer.routing_stats()["dropped"], dropped)
    # a compiled training forward moves the balance bias as an eager one does
    eager = copy.deepcopy(dense).train()
    dense.train()
    x = torch.randn(9, 4)
    torch.testing.assert_close(torch.compile(dense, fullgraph=True, dynamic=False)(x), eager(x))
    assert torch.count_nonzero(dense.balance_bias) > 0
    torch.testing.assert_close(dense.balance_bias, eager.balance_bias)


# ---------------------------------------------------------------------------------------------
# n_shared_experts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [None, 1])
def test_shared_experts_dense(top_k) -> None:
    torch.manual_seed(11)
    layer = DenseMoE(
        4, 3, 3, top_k=top_k, n_shared_experts=2, expert_activation="relu",
        gating_activation="softmax",
    ).double()  # fmt: skip
    assert layer.shared_expert_kernel.shape == (4, 3, 2)
    assert layer.shared_expert_bias.shape == (3, 2)
    randomize(layer)
    x = torch.randn(5, 4, dtype=F64)
    gates, _ = ref_gates(layer, x)
    torch.testing.assert_close(layer(x), ref_dense(layer, x, gates))
    assert "n_shared_experts=2" in repr(layer)


@pytest.mark.parametrize("backend", ["channels", "kernel_mix"])
@pytest.mark.parametrize("ndim", [1, 2])
def test_shared_experts_conv(backend, ndim) -> None:
    torch.manual_seed(12)
    layer = conv_layer(ndim, backend=backend, n_shared_experts=2, top_k=2)
    assert layer.shared_expert_kernel.shape == (4 * 2, 2, *(3,) * ndim)
    assert layer.shared_expert_bias.shape == (4, 2)
    x = torch.randn(3, 2, *SIZE[ndim], dtype=F64)
    gates, _ = ref_gates(layer, conv_features(layer, x))
    torch.testing.assert_close(layer(x), ref_conv(layer, x, gates))


def test_shared_experts_init_layout_and_errors() -> None:
    torch.manual_seed(13)
    conv = Conv2dMoE(16, 8, 2, 3, None, gate_input="pooled", n_shared_experts=3,
                     use_expert_bias=False)  # fmt: skip
    assert conv.shared_expert_bias is None
    std = 1 / math.sqrt(16 * 9)
    assert conv.shared_expert_kernel.std().item() == pytest.approx(std, rel=0.1)
    dense = DenseMoE(30, 20, 2, n_shared_experts=4)
    a = math.sqrt(3 / 25)
    assert dense.shared_expert_kernel.abs().max().item() <= a
    # channels_last input, channels_last output, as without shared experts
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    assert conv(x).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="n_shared_experts must be an integer >= 0"):
        DenseMoE(4, 3, 2, n_shared_experts=-1)
    with pytest.raises(ValueError, match=r"softmax.*shared"):
        DenseMoE(4, 3, 2, n_shared_experts=1, expert_activation="softmax")


# ---------------------------------------------------------------------------------------------
# dead experts
# ---------------------------------------------------------------------------------------------


def test_dead_experts_top_k() -> None:
    """K=4, top-1, logits of experts 2 and 3 pushed far down: 2 of 4 experts dead."""
    torch.manual_seed(14)
    layer = DenseMoE(4, 3, 4, top_k=1)
    with torch.no_grad():
        layer.gating_bias.copy_(torch.tensor([0.0, 0.0, -100.0, -100.0]))
    layer(torch.randn(32, 4))
    assert layer.routing_stats()["dead"].item() == 0.5
    assert layer.routing_stats()["dropped"].item() == 0.0


def test_dead_experts_dense_gates_and_groups() -> None:
    torch.manual_seed(15)
    dense = DenseMoE(4, 3, 4, gating_activation="softmax", gating_kernel_initializer_scale=0.1)
    with torch.no_grad():
        dense.gating_bias.copy_(torch.tensor([0.0, 0.0, -20.0, 0.0]))  # share ~1e-9 < 1e-3/4
    dense(torch.randn(16, 4))
    assert dense.routing_stats()["dead"].item() == 0.25
    # conv, two gate groups of three experts: group 0 uses only expert 0, group 1 all three
    conv = Conv2dMoE(2, 4, 3, 3, (5, 5), top_k=1, gate_groups=2)
    with torch.no_grad():
        conv.gating_kernel.zero_()
        conv.gating_bias.copy_(torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
        conv.gating_kernel[:, :, :, 1] = torch.randn(2, 5, 5, 3) * 10  # group 1 varies
    conv(torch.randn(64, 2, 5, 5))
    assert conv.routing_stats()["dead"].item() == pytest.approx(2 / 6)


# ---------------------------------------------------------------------------------------------
# gradients, pickling, state dicts, porting
# ---------------------------------------------------------------------------------------------


def _gradcheck(layer, x) -> None:
    names, params = zip(*layer.named_parameters(), strict=True)

    def fn(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params))


def test_gradcheck_gate_groups_one_kernel_mix() -> None:
    torch.manual_seed(16)
    layer = conv_layer(2, backend="kernel_mix", gate_groups=1)
    _gradcheck(layer, torch.randn(2, 2, 5, 4, dtype=F64))


def test_gradcheck_gate_groups_two_kernel_mix() -> None:
    torch.manual_seed(17)
    layer = conv_layer(1, backend="kernel_mix", gate_groups=2)
    _gradcheck(layer, torch.randn(2, 2, 7, dtype=F64))


def test_gradcheck_gate_hidden() -> None:
    torch.manual_seed(18)
    layer = DenseMoE(3, 2, 3, gate_hidden=4, gating_activation="softmax").double()
    randomize(layer)
    _gradcheck(layer, torch.randn(4, 3, dtype=F64))


def test_gradcheck_shared_experts() -> None:
    torch.manual_seed(19)
    layer = conv_layer(1, n_shared_experts=2, gate_input="pooled")
    _gradcheck(layer, torch.randn(2, 2, 7, dtype=F64))
    dense = DenseMoE(3, 2, 2, n_shared_experts=2, expert_activation="tanh").double()
    randomize(dense)
    _gradcheck(dense, torch.randn(3, 3, dtype=F64))


def test_gradcheck_capacity_dense() -> None:
    torch.manual_seed(20)
    layer = DenseMoE(3, 2, 3, top_k=2, capacity_factor=0.5, expert_activation="tanh").double()
    randomize(layer)
    _gradcheck(layer, torch.randn(6, 3, dtype=F64))


ALL_VARIANTS = {
    "gate_groups": 2, "gate_hidden": 3, "gate_temperature": 0.7, "top_k": 2,
    "balance": "aux_free", "capacity_factor": 0.8, "n_shared_experts": 1,
}  # fmt: skip


def test_all_variants_together_pickle_copy_and_state_dict() -> None:
    torch.manual_seed(21)
    layer = conv_layer(2, **ALL_VARIANTS)
    x = torch.randn(3, 2, 5, 4, dtype=F64)
    layer(x)  # a training forward: moves the balance bias
    gates, chosen = ref_gates(layer.eval(), conv_features(layer, x))
    gates, _ = ref_capacity(gates, chosen, 0.8, 2)
    y = layer(x)
    torch.testing.assert_close(y, ref_conv(layer, x, gates))
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert other.gate_temperature == 0.7
        torch.testing.assert_close(other(x), y)
    fresh = conv_layer(2, **ALL_VARIANTS).eval()
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y)
    text = repr(layer)
    for part in ("gate_groups=2", "gate_hidden=3", "gate_temperature=0.7", "capacity_factor=0.8",
                 "n_shared_experts=1", "balance='aux_free'"):  # fmt: skip
        assert part in text


def test_defaults_add_no_state_and_show_no_options() -> None:
    layer = Conv2dMoE(2, 4, 3, 3, (5, 5))
    assert set(layer.state_dict()) == {"expert_kernel", "gating_kernel", "expert_bias",
                                       "gating_bias"}  # fmt: skip
    text = repr(layer)
    for name in ALL_VARIANTS:
        if name != "top_k":
            assert name not in text


def test_load_keras_weights_refuses_variants_without_a_counterpart() -> None:
    for kw in ({"gate_groups": 2}, {"gate_hidden": 3}, {"n_shared_experts": 1}):
        layer = Conv2dMoE(2, 4, 2, 3, (5, 5), **kw)
        with pytest.raises(ValueError, match=next(iter(kw))):
            load_keras_weights(layer, {})
    # options that keep the original's weights still load
    layer = DenseMoE(4, 3, 2, gate_temperature=2.0, gate_groups=1)
    donor = DenseMoE(4, 3, 2)
    load_keras_weights(layer, {n: p.detach() for n, p in donor.named_parameters()})
    assert torch.equal(layer.expert_kernel, donor.expert_kernel)


@pytest.mark.parametrize("backend", ["channels", "kernel_mix"])
def test_all_variants_channels_last_data_format(backend) -> None:
    options = {**ALL_VARIANTS, "expert_backend": backend}
    first = Conv2dMoE(2, 4, 3, 3, (5, 4), padding="same", **options).double().eval()
    last = Conv2dMoE(
        2, 4, 3, 3, (5, 4), padding="same", data_format="channels_last", **options
    ).double().eval()  # fmt: skip
    last.load_state_dict(first.state_dict())
    x = torch.randn(3, 2, 5, 4, dtype=F64)
    torch.testing.assert_close(last(x.movedim(1, -1).contiguous()), first(x).movedim(1, -1))


@pytest.mark.parametrize("n_experts", [3, 9])  # K <= 8k: the groups' GEMMs; beyond: gathers
def test_gate_groups_top_k_kernel_mix_both_mixes(n_experts) -> None:
    torch.manual_seed(22)
    layer = Conv1dMoE(2, 4, n_experts, 3, 7, top_k=1, gate_groups=2, expert_backend="kernel_mix")
    layer = layer.double()
    randomize(layer)
    x = torch.randn(3, 2, 7, dtype=F64)
    gates, _ = ref_gates(layer, conv_features(layer, x))
    torch.testing.assert_close(layer(x), ref_conv(layer, x, gates))
    if n_experts == 3:
        _gradcheck(layer, x)
