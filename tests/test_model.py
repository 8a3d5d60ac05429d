"""The explicit engine against torch.autograd, and the seed's claims about it (issue 2)."""

from __future__ import annotations

import itertools

import pytest
import torch

from partition.model import (
    MLPSpec,
    add_decay,
    backward_layers,
    forward_layers,
    init_weights,
    loss_grad,
    loss_sum,
    make_layer,
    zero_grads,
)
from partition.reference import reference_grads


def explicit_grads(spec: MLPSpec, full, X, y, micro: int = 1):
    layers = [make_layer(full, l, dtype=torch.float64) for l in range(spec.num_layers)]
    grads = zero_grads(layers)
    total = 0.0
    for xm, ym in zip(X.chunk(micro), y.chunk(micro)):
        o, caches = forward_layers(spec, layers, xm, keep=True)
        total += float(loss_sum(spec.loss, o, ym))
        backward_layers(spec, layers, caches, grads, loss_grad(spec.loss, o, ym, X.shape[0]),
                        need_input_grad=False)
    add_decay(layers, grads, spec.weight_decay)
    return layers, grads, total / X.shape[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error; absolute where the reference is exactly zero (dead units)."""
    num, den = float((a - b).norm()), float(b.norm())
    return num / den if den > 0 else num


def batch(spec: MLPSpec, B: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, spec.dims[0], generator=g, dtype=torch.float64)
    if spec.loss == "cross_entropy":
        y = torch.randint(0, spec.dims[-1], (B,), generator=g)
    else:
        y = torch.randn(B, spec.dims[-1], generator=g, dtype=torch.float64)
    return X, y


DIMS = [[7, 5, 3], [9, 4], [13, 11, 6, 5], [6, 8, 7, 5, 4], [10, 3, 9, 2, 7, 3]]


@pytest.mark.parametrize("dims", DIMS, ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("activation,loss", list(itertools.product(
    ["relu", "tanh", "sigmoid"], ["cross_entropy", "squared_error"])))
@pytest.mark.parametrize("bias,wd", [(False, 0.0), (True, 0.05)])
def test_explicit_gradients_match_autograd(dims, activation, loss, bias, wd):
    spec = MLPSpec(tuple(dims), activation, loss, bias, wd)
    full = init_weights(spec, seed=3)
    if bias:  # non-zero biases, so their gradients and the forward are really exercised
        g = torch.Generator().manual_seed(1)
        for k in full:
            if k.startswith("b"):
                full[k] = torch.randn(full[k].shape, generator=g, dtype=torch.float64)
    X, y = batch(spec, 11, seed=4)
    layers, grads, L = explicit_grads(spec, full, X, y)
    J_ref, ref = reference_grads(spec, full, X, y)
    sq = sum(float((full[f"W{l + 1}"] ** 2).sum()) for l in range(spec.num_layers))
    assert abs(L + 0.5 * wd * sq - J_ref) <= 1e-12 * abs(J_ref)
    for layer, gr in zip(layers, grads):
        assert rel(gr.W, ref[f"W{layer.index + 1}"]) <= 1e-12
        if bias:
            assert rel(gr.b, ref[f"b{layer.index + 1}"]) <= 1e-12


@pytest.mark.parametrize("dims,micro", [([7, 5, 3], 4), ([13, 11, 6, 5], 3), ([9, 4], 12)])
def test_microbatches_give_the_full_batch_update(dims, micro):
    spec = MLPSpec(tuple(dims), "tanh", "cross_entropy", True, 0.01)
    full = init_weights(spec, seed=5)
    X, y = batch(spec, 12, seed=6)
    _, g_full, L_full = explicit_grads(spec, full, X, y, micro=1)
    _, g_micro, L_micro = explicit_grads(spec, full, X, y, micro=micro)
    assert abs(L_full - L_micro) <= 1e-12 * abs(L_full)
    for a, b in zip(g_micro, g_full):
        assert rel(a.W, b.W) <= 1e-12
        assert rel(a.b, b.b) <= 1e-12


def test_prediction_forward_keeps_nothing():
    spec = MLPSpec((6, 8, 7, 5), "relu", "cross_entropy")
    full = init_weights(spec, seed=0)
    layers = [make_layer(full, l, dtype=torch.float64) for l in range(spec.num_layers)]
    X, _ = batch(spec, 4, seed=0)
    o_pred, kept_pred = forward_layers(spec, layers, X, keep=False)
    o_train, kept_train = forward_layers(spec, layers, X, keep=True)
    assert kept_pred == []
    assert torch.equal(o_pred, o_train)
    # Training keeps every layer's input and, for the hidden layers, z: the seed's extra memory.
    assert len(kept_train) == 3
    assert sum(c.nbytes() for c in kept_train) == 8 * 4 * (6 + 8 + 8 + 7 + 7)


def test_init_is_the_same_whatever_the_dtype_or_call():
    spec = MLPSpec((5, 4, 3), bias=True)
    a, b = init_weights(spec, seed=7), init_weights(spec, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(a) == {"W1", "b1", "W2", "b2"} and a["W1"].shape == (4, 5)
    assert not torch.equal(a["W1"], init_weights(spec, seed=8)["W1"])
