"""Bad input to the MoE layers gives a ValueError that names the problem, with what was expected
and what was got, at construction or at the start of forward (never from deep inside torch)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from moe_lab.layers import Conv1dMoE, Conv2dMoE, Conv3dMoE, DenseMoE

# id -> (constructor call, substrings the message must contain)
CONSTRUCTION_ERRORS: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...]]] = {
    "n_experts_zero": (lambda: DenseMoE(4, 3, 0), ("n_experts", "positive integer", "got 0")),
    "n_experts_negative_conv": (lambda: Conv2dMoE(3, 4, -1, 3, (8, 8)), ("n_experts", "got -1")),
    "n_experts_float": (lambda: DenseMoE(4, 3, 2.0), ("n_experts", "got 2.0")),
    "in_features_zero": (lambda: DenseMoE(0, 3, 2), ("in_features", "positive integer", "got 0")),
    "out_features_negative": (lambda: DenseMoE(4, -3, 2), ("out_features", "got -3")),
    "in_channels_zero": (lambda: Conv1dMoE(0, 4, 2, 3, 8), ("in_channels", "got 0")),
    "out_channels_zero": (lambda: Conv3dMoE(2, 0, 2, 3, (4, 4, 4)), ("out_channels", "got 0")),
    "kernel_size_zero": (
        lambda: Conv2dMoE(3, 4, 2, (3, 0), (8, 8)),
        ("kernel_size", ">= 1", "(3, 0)"),
    ),
    "kernel_size_float": (lambda: Conv1dMoE(3, 4, 2, 2.5, 8), ("kernel_size", "int", "2.5")),
    "kernel_size_wrong_length": (
        lambda: Conv2dMoE(3, 4, 2, (3, 3, 3), (8, 8)),
        ("kernel_size", "2 entries", "(3, 3, 3)"),
    ),
    "stride_zero": (lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), stride=0), ("stride", ">= 1", "got 0")),
    "dilation_negative": (
        lambda: Conv1dMoE(3, 4, 2, 3, 8, dilation=-2),
        ("dilation", ">= 1", "got -2"),
    ),
    "input_size_zero": (lambda: Conv2dMoE(3, 4, 2, 3, (8, 0)), ("input_size", ">= 1", "(8, 0)")),
    "input_size_wrong_length": (
        lambda: Conv3dMoE(3, 4, 2, 3, (8, 8)),
        ("input_size", "3 entries", "(8, 8)"),
    ),
    "input_too_small_for_kernel": (
        lambda: Conv2dMoE(3, 4, 2, 5, (3, 8)),
        ("input_size (3, 8)", "kernel_size (5, 5)", "output size would be (-1, 4)"),
    ),
    "negative_padding": (
        lambda: Conv1dMoE(3, 4, 2, 3, 8, padding=-1),
        ("padding", ">= 0", "got -1"),
    ),
    "padding_wrong_length": (
        lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), padding=(1, 1, 1)),
        ("padding", "2 entries", "(1, 1, 1)"),
    ),
    "unknown_padding": (
        lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), padding="full"),
        ("unknown mode 'full'", "'valid'", "'same'", "'causal'"),
    ),
    "causal_2d": (lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), padding="causal"), ("causal", "1D", "2D")),
    "causal_3d": (
        lambda: Conv3dMoE(3, 4, 2, 3, (8, 8, 8), padding="causal"),
        ("causal", "1D", "3D"),
    ),
    "unknown_expert_activation": (
        lambda: DenseMoE(4, 3, 2, expert_activation="relu6"),
        ("expert_activation", "unknown activation 'relu6'", "relu", "softmax", "hard_sigmoid"),
    ),
    "unknown_gating_activation": (
        lambda: Conv1dMoE(3, 4, 2, 3, 8, gating_activation="sofmax"),
        ("gating_activation", "unknown activation 'sofmax'", "softmax"),
    ),
    "activation_wrong_type": (
        lambda: DenseMoE(4, 3, 2, expert_activation=3),
        ("expert_activation", "got int"),
    ),
    "unknown_regularizer": (
        lambda: DenseMoE(4, 3, 2, expert_kernel_regularizer="l3"),
        ("expert_kernel_regularizer", "unknown regularizer 'l3'", "l1, l2, l1_l2"),
    ),
    "unknown_activity_regularizer": (
        lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), activity_regularizer="ridge"),
        ("activity_regularizer", "unknown regularizer 'ridge'"),
    ),
    "regularizer_dict_bad_key": (
        lambda: DenseMoE(4, 3, 2, gating_kernel_regularizer={"l1": 0.1, "l3": 1.0}),
        ("gating_kernel_regularizer", "['l3']", "'l1' and 'l2'"),
    ),
    "regularizer_negative_factor": (
        lambda: DenseMoE(4, 3, 2, gating_bias_regularizer={"l2": -1.0}),
        ("gating_bias_regularizer", ">= 0", "-1.0"),
    ),
    "regularizer_factor_not_a_number": (
        lambda: DenseMoE(4, 3, 2, expert_bias_regularizer={"l2": "big"}),
        ("expert_bias_regularizer", "finite number", "'big'"),
    ),
    "unknown_constraint": (
        lambda: DenseMoE(4, 3, 2, expert_kernel_constraint="maxnorm"),
        (
            "expert_kernel_constraint",
            "unknown constraint 'maxnorm'",
            "max_norm, non_neg, unit_norm, min_max_norm",
        ),
    ),
    "unknown_constraint_dict": (
        lambda: Conv1dMoE(3, 4, 2, 3, 8, gating_kernel_constraint={"name": "clip"}),
        ("gating_kernel_constraint", "unknown constraint 'clip'"),
    ),
    "constraint_bad_argument": (
        lambda: DenseMoE(4, 3, 2, expert_kernel_constraint={"name": "max_norm", "maxvalue": 3}),
        ("expert_kernel_constraint", "['maxvalue']", "max_value, axis"),
    ),
    "constraint_axis_out_of_range": (
        lambda: DenseMoE(4, 3, 2, expert_kernel_constraint={"name": "unit_norm", "axis": 3}),
        ("expert_kernel_constraint", "axis 3", "(4, 3, 2)", "[-3, 2]"),
    ),
    "constraint_axis_repeated": (
        lambda: Conv2dMoE(
            3, 4, 2, 3, (8, 8), expert_kernel_constraint={"name": "max_norm", "axis": [1, -3]}
        ),
        ("expert_kernel_constraint", "(1, -3)", "distinct"),
    ),
    "min_max_norm_bounds": (
        lambda: DenseMoE(
            4,
            3,
            2,
            gating_kernel_constraint={"name": "min_max_norm", "min_value": 2, "max_value": 1},
        ),
        ("min_max_norm", "min_value <= max_value", "min_value=2.0, max_value=1.0"),
    ),
    "unknown_bias_initializer": (
        lambda: DenseMoE(4, 3, 2, expert_bias_initializer="glorot"),
        ("expert_bias_initializer", "unknown initializer 'glorot'", "zeros, ones, constant"),
    ),
    "bias_initializer_bad_argument": (
        lambda: DenseMoE(4, 3, 2, gating_bias_initializer={"name": "constant", "val": 1}),
        ("gating_bias_initializer", "['val']", "takes: value"),
    ),
    "bias_initializer_argument_for_zeros": (
        lambda: DenseMoE(4, 3, 2, gating_bias_initializer={"name": "zeros", "value": 1}),
        ("gating_bias_initializer", "['value']", "no arguments"),
    ),
    "bias_initializer_nan": (
        lambda: DenseMoE(4, 3, 2, expert_bias_initializer=float("nan")),
        ("expert_bias_initializer", "finite", "nan"),
    ),
    "negative_initializer_scale": (
        lambda: Conv2dMoE(3, 4, 2, 3, (8, 8), gating_kernel_initializer_scale=-1.0),
        ("gating_kernel_initializer_scale", ">= 0", "-1.0"),
    ),
}


@pytest.mark.parametrize("case", list(CONSTRUCTION_ERRORS))
def test_construction_errors(case: str) -> None:
    build, parts = CONSTRUCTION_ERRORS[case]
    with pytest.raises(ValueError) as info:
        build()
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def _dense() -> nn.Module:
    return DenseMoE(4, 3, 2)


def _conv2d() -> nn.Module:
    return Conv2dMoE(3, 4, 2, 3, (8, 8), padding="same")


# id -> (layer, input, substrings: what was expected and what was got)
FORWARD_ERRORS: dict[
    str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], tuple[str, ...]]
] = {
    "dense_wrong_features": (_dense, lambda: torch.randn(2, 5), ("(*, 4)", "(2, 5)")),
    "dense_scalar": (_dense, lambda: torch.tensor(1.0), ("(*, 4)", "got shape ()")),
    "dense_integer_input": (
        _dense,
        lambda: torch.ones(2, 4, dtype=torch.int64),
        ("floating-point", "torch.int64"),
    ),
    "dense_dtype_mismatch": (
        _dense,
        lambda: torch.randn(2, 4, dtype=torch.float64),
        ("torch.float32 weights", "torch.float64 input", "autocast"),
    ),
    "conv_wrong_rank": (
        _conv2d,
        lambda: torch.randn(3, 8, 8),
        ("4D input (B, 3, 8, 8)", "(3, 8, 8)"),
    ),
    "conv_wrong_rank_5d": (
        _conv2d,
        lambda: torch.randn(1, 1, 3, 8, 8),
        ("4D input", "(1, 1, 3, 8, 8)"),
    ),
    "conv_wrong_channels": (
        _conv2d,
        lambda: torch.randn(2, 1, 8, 8),
        ("3 input channels", "got 1"),
    ),
    "conv_channels_last_layout_by_mistake": (
        _conv2d,
        lambda: torch.randn(2, 8, 8, 3),
        ("3 input channels", "got 8", "channels first"),
    ),
    "conv_wrong_spatial_size": (
        _conv2d,
        lambda: torch.randn(2, 3, 8, 9),
        ("spatial size (8, 8)", "got (8, 9)", "input_size=(8, 9)"),
    ),
    "conv_integer_input": (
        _conv2d,
        lambda: torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
        ("floating-point", "torch.uint8"),
    ),
    "conv_dtype_mismatch": (
        _conv2d,
        lambda: torch.randn(2, 3, 8, 8, dtype=torch.bfloat16),
        ("torch.float32 weights", "torch.bfloat16 input"),
    ),
    "conv1d_wrong_length": (
        lambda: Conv1dMoE(2, 2, 2, 3, 10),
        lambda: torch.randn(1, 2, 12),
        ("spatial size (10,)", "got (12,)"),
    ),
    "conv3d_wrong_rank": (
        lambda: Conv3dMoE(1, 2, 2, 2, (3, 3, 3)),
        lambda: torch.randn(1, 3, 3, 3),
        ("5D input", "(1, 3, 3, 3)"),
    ),
}


@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_forward_errors(case: str) -> None:
    build, make_input, parts = FORWARD_ERRORS[case]
    layer, x = build(), make_input()
    with pytest.raises(ValueError) as info:
        layer(x)
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_dtype_mismatch_is_allowed_under_autocast() -> None:
    layer = _conv2d()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_constraint_and_regularizer_callables_that_return_the_wrong_thing() -> None:
    layer = DenseMoE(4, 3, 2, expert_kernel_constraint=lambda w: w.sum(0))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "expert_kernel_constraint must return a tensor of the weight's shape (4, 3, 2), got (3, 2)"
        ),
    ):
        layer.apply_constraints()
    layer = DenseMoE(4, 3, 2, gating_kernel_regularizer=lambda w: w.abs())
    with pytest.raises(
        ValueError,
        match=re.escape("gating_kernel_regularizer must return a scalar tensor, got shape (4, 2)"),
    ):
        layer.regularization_loss()
    layer = DenseMoE(4, 3, 2, activity_regularizer=lambda y: 0.5)
    with pytest.raises(
        ValueError, match="activity_regularizer must return a scalar tensor, got float"
    ):
        layer(torch.randn(2, 4))
