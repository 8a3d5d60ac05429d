"""The autograd reference: gradients of J at given weights, in float64 on the CPU.

Used by the run's gradient check and by the tests; never by the engines.
"""

from __future__ import annotations

import torch

from partition.model import MLPSpec, weight_names


def reference_grads(spec: MLPSpec, full: dict[str, torch.Tensor], X: torch.Tensor,
                    y: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """J and dJ/d(every tensor in `full`) by torch.autograd, float64."""
    params = {k: v.detach().double().cpu().clone().requires_grad_(True) for k, v in full.items()}
    h = X.double().cpu()
    L = spec.num_layers
    for l in range(L):
        wname, bname = weight_names(l)
        z = h @ params[wname].T
        if bname in params:
            z = z + params[bname]
        if l < L - 1:
            h = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[spec.activation](z)
        else:
            h = z
    if spec.loss == "cross_entropy":
        data_loss = torch.nn.functional.cross_entropy(h, y.cpu())
    else:
        data_loss = 0.5 * ((h - y.double().cpu()) ** 2).sum() / X.shape[0]
    s = 0.5 * spec.weight_decay * sum((params[weight_names(l)[0]] ** 2).sum() for l in range(L))
    J = data_loss + s
    J.backward()
    return float(J.detach()), {k: p.grad for k, p in params.items()}
