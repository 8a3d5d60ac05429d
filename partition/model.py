"""The seed MLP with explicit forward and backward propagation (docs/seed.md).

Notation follows the seed: for layer l (1-based in the text, 0-based in code)
    z_l = W_l x_l (+ b_l)       x_0 = X, a minibatch with examples as rows
    x_{l+1} = phi(z_l)           for every layer but the last
    o = z_{L-1}
    J = L(o, y) + lambda/2 * sum_l ||W_l||_F^2

Everything here is written out by hand; autograd is only the reference in tests.
The functions work on any contiguous run of layers (a pipeline stage) and on
any shard of a layer (tensor parallel), so every strategy reuses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ACTIVATIONS = ("relu", "tanh", "sigmoid")
LOSSES = ("cross_entropy", "squared_error")


@dataclass(frozen=True)
class MLPSpec:
    """Shape and maths of the network; `dims` = [d, n_1, ..., q]."""

    dims: tuple[int, ...]
    activation: str = "relu"
    loss: str = "cross_entropy"
    bias: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if len(self.dims) < 2:
            raise ValueError(f"model.dims needs at least 2 entries, got {list(self.dims)}")
        if any(int(n) <= 0 for n in self.dims):
            raise ValueError(f"model.dims entries must be positive, got {list(self.dims)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def num_layers(self) -> int:
        return len(self.dims) - 1

    def weight_shape(self, layer: int) -> tuple[int, int]:
        """(n_l, n_{l-1}) as in the seed: W maps R^{n_in} to R^{n_out}."""
        return (self.dims[layer + 1], self.dims[layer])

    def layer_params(self, layer: int) -> int:
        n_out, n_in = self.weight_shape(layer)
        return n_out * n_in + (n_out if self.bias else 0)


@dataclass
class Layer:
    """One weight matrix (and bias) of the full net, or a shard of it.

    `rows`/`cols` say which slice of the full (n_out, n_in) matrix this holds,
    so that shards can be put back together (weights.npz is always full).
    """

    index: int
    W: torch.Tensor  # (n_out_local, n_in_local)
    b: torch.Tensor | None = None  # (n_out_local,)
    rows: tuple[int, int] | None = None  # slice of the full W's rows; None = all
    cols: tuple[int, int] | None = None  # slice of the full W's columns; None = all
    bias_owner: bool = True  # False where another shard owns b (row-parallel layers)

    def tensors(self) -> list[torch.Tensor]:
        return [self.W] + ([self.b] if self.b is not None else [])


@dataclass
class Grads:
    """Accumulated gradients of one Layer (data term only until `add_decay`)."""

    W: torch.Tensor
    b: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.W] + ([self.b] if self.b is not None else [])

    def clone(self) -> Grads:
        return Grads(self.W.clone(), self.b.clone() if self.b is not None else None)


def weight_names(index: int) -> tuple[str, str]:
    """File names of layer `index` (0-based): W1/b1 for the first layer, as in the seed."""
    return f"W{index + 1}", f"b{index + 1}"


def init_weights(spec: MLPSpec, seed: int) -> dict[str, torch.Tensor]:
    """Full, unsharded float64 weights from `seed` — identical for any strategy and P.

    W_l ~ N(0, 1/n_in) so activations keep their scale; biases start at zero.
    Drawn in float64 on the CPU and cast later, so float32 and float64 runs start
    from the same numbers (up to rounding) and no device's RNG is involved.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, torch.Tensor] = {}
    for l in range(spec.num_layers):
        n_out, n_in = spec.weight_shape(l)
        wname, bname = weight_names(l)
        out[wname] = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) / n_in**0.5
        if spec.bias:
            out[bname] = torch.zeros(n_out, dtype=torch.float64)
    return out


def make_layer(
    full: dict[str, torch.Tensor],
    index: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    bias_owner: bool = True,
) -> Layer:
    """Slice layer `index` out of the full weights (copying, so shards own their storage)."""
    wname, bname = weight_names(index)
    W = full[wname]
    r = slice(*rows) if rows else slice(None)
    c = slice(*cols) if cols else slice(None)
    w_local = W[r, c].to(device=device, dtype=dtype).contiguous().clone()
    b_local = None
    if bname in full and bias_owner:
        b_local = full[bname][r].to(device=device, dtype=dtype).contiguous().clone()
    return Layer(index, w_local, b_local, rows, cols, bias_owner)


# ---------------------------------------------------------------- activations


def activation_forward(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {name!r}")


def activation_backward(name: str, z: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """dJ/dz = dJ/dh ⊙ phi'(z), the seed's elementwise step."""
    if name == "relu":
        # One fused pass (dh where z > 0, else 0): the same values as dh * (z > 0) without
        # allocating the two mask tensors — ~6x faster on a (64, 256) block.
        return torch.ops.aten.threshold_backward(dh, z, 0)
    if name == "tanh":
        t = torch.tanh(z)
        return dh * (1 - t * t)
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return dh * s * (1 - s)
    raise ValueError(f"unknown activation {name!r}")


# ---------------------------------------------------------------- losses


def loss_sum(name: str, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of l(o, y); the caller divides by the full batch size.

    Summing here (not averaging) is what makes M micro-batches add up to exactly
    the full-batch mean.
    """
    if name == "cross_entropy":
        logp = torch.log_softmax(o, dim=1)  # (B, q)
        return -logp.gather(1, y.view(-1, 1)).sum()
    if name == "squared_error":
        diff = o - y
        return 0.5 * (diff * diff).sum()
    raise ValueError(f"unknown loss {name!r}")


def loss_grad(name: str, o: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
    """dJ/do for the rows in `o`, when J averages over a batch of `batch` rows."""
    if name == "cross_entropy":
        g = torch.softmax(o, dim=1)  # (B, q)
        g[torch.arange(o.shape[0], device=o.device), y] -= 1
        return g.div_(batch)
    if name == "squared_error":
        return (o - y).div_(batch)
    raise ValueError(f"unknown loss {name!r}")


def loss_and_grad(spec: MLPSpec, o: torch.Tensor, y: torch.Tensor, batch: int, *,
                  dtype: torch.dtype) -> tuple[float, int | None, torch.Tensor]:
    """Loss sum over these rows, correct count, and dJ/do for a batch of `batch` rows.

    The loss is computed in `dtype`, the master weights' (bfloat16 logits are promoted
    first, as autocast does for softmax and losses); dJ/do goes back in o's dtype.
    """
    lo = o if o.dtype == dtype else o.to(dtype)
    total = to_float(loss_sum(spec.loss, lo, y))
    correct = correct_count(o, y) if spec.loss == "cross_entropy" else None
    g = loss_grad(spec.loss, lo, y, batch)
    return total, correct, g if g.dtype == o.dtype else g.to(o.dtype)


def correct_count(o: torch.Tensor, y: torch.Tensor) -> int:
    return 0 if o.is_meta else int((o.argmax(dim=1) == y).sum())


def to_float(t: torch.Tensor) -> float:
    """A 0-d tensor's value; 0.0 on the meta device, where the dry run has shapes, no values."""
    return 0.0 if t.is_meta else float(t)


# ---------------------------------------------------------------- layers


@dataclass
class Cache:
    """What one layer keeps for backward: its input x and, for hidden layers, z."""

    x: torch.Tensor
    z: torch.Tensor | None

    def nbytes(self) -> int:
        n = self.x.numel() * self.x.element_size()
        if self.z is not None:
            n += self.z.numel() * self.z.element_size()
        return n


def linear(x: torch.Tensor, layer: Layer) -> torch.Tensor:
    # (B, n_in) @ (n_in, n_out) -> (B, n_out)
    z = x @ layer.W.T
    if layer.b is not None:
        z += layer.b
    return z


def weight_grad(dz: torch.Tensor, cache_x: torch.Tensor, grads: Grads) -> None:
    """Accumulate the data term of dJ/dW = dJ/dz xᵀ (and dJ/db): the seed's W half.

    Mixed precision (dz, x in bfloat16, grads in the master dtype): the product is made in
    the compute dtype, as autocast makes it, and accumulated into the master-dtype buffer,
    so micro-batches add up in float32.
    """
    if dz.dtype == grads.W.dtype:
        # (n_out, B) @ (B, n_in) -> (n_out, n_in)
        grads.W.addmm_(dz.T, cache_x)
        if grads.b is not None:
            grads.b += dz.sum(dim=0)
        return
    # (n_out, B) @ (B, n_in) -> (n_out, n_in), in dz's dtype, then added in the grads'
    grads.W.add_(dz.T @ cache_x)
    if grads.b is not None:
        grads.b += dz.sum(dim=0, dtype=grads.b.dtype)


def input_grad(dz: torch.Tensor, layer: Layer) -> torch.Tensor:
    """dJ/dx = Wᵀ dJ/dz, as rows: the seed's I half (what the layer below waits for)."""
    # (B, n_out) @ (n_out, n_in) -> (B, n_in)
    return dz @ layer.W


def linear_backward(
    dz: torch.Tensor, cache_x: torch.Tensor, layer: Layer, grads: Grads, *, need_input_grad: bool
) -> torch.Tensor | None:
    """Accumulate dJ/dW (data term) and dJ/db; return dJ/dx if asked."""
    weight_grad(dz, cache_x, grads)
    return input_grad(dz, layer) if need_input_grad else None


def forward_layers(
    spec: MLPSpec, layers: list[Layer], x: torch.Tensor, *, keep: bool,
    skip_output: bool = False,
) -> tuple[torch.Tensor, list[Cache]]:
    """Run a contiguous run of layers; the last layer of the net gets no activation.

    With keep=False (prediction) nothing is stored: each intermediate is freed as
    soon as the next exists — the seed's point that training costs more memory.
    skip_output=True (recomputation in a backward): the net's output layer only records
    its input, since its backward needs x and dJ/do, never o; the output is then that x.
    """
    caches: list[Cache] = []
    last = spec.num_layers - 1
    for layer in layers:
        if skip_output and layer.index == last:
            caches.append(Cache(x, None))
            break
        z = linear(x, layer)
        if layer.index == last:
            if keep:
                caches.append(Cache(x, None))
            x = z
        else:
            h = activation_forward(spec.activation, z)
            if keep:
                caches.append(Cache(x, z))
            x = h
    return x, caches


def backward_layers(
    spec: MLPSpec,
    layers: list[Layer],
    caches: list[Cache],
    grads: list[Grads],
    g: torch.Tensor,
    *,
    need_input_grad: bool,
) -> torch.Tensor | None:
    """Backward through the layers of `forward_layers`, given g = dJ/d(output).

    Follows the seed's order: for the output layer dJ/dW = dJ/do hᵀ, then
    dJ/dh = Wᵀ dJ/do, dJ/dz = dJ/dh ⊙ phi'(z), and so on down.
    """
    last = spec.num_layers - 1
    for i in range(len(layers) - 1, -1, -1):
        layer, cache = layers[i], caches[i]
        dz = g if layer.index == last else activation_backward(spec.activation, cache.z, g)
        want_dx = need_input_grad or i > 0
        g = linear_backward(dz, cache.x, layer, grads[i], need_input_grad=want_dx)
        caches[i] = None  # type: ignore[call-overload]  # free as we go, as a real backward would
    return g


@dataclass
class WeightPart:
    """What a deferred W needs of one layer: dJ/dz and the layer's input x."""

    dz: torch.Tensor
    x: torch.Tensor


def backward_input(
    spec: MLPSpec,
    layers: list[Layer],
    caches: list[Cache],
    g: torch.Tensor,
    *,
    need_input_grad: bool,
) -> tuple[torch.Tensor | None, list[WeightPart]]:
    """The I half of `backward_layers`: dJ/dz of every layer and dJ/d(input), no dJ/dW.

    Returns the input gradient (None if not asked) and, per layer, what `backward_weight`
    needs; z is freed here, x and dJ/dz live on until the W.
    """
    last = spec.num_layers - 1
    parts: list[WeightPart | None] = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        layer, cache = layers[i], caches[i]
        dz = g if layer.index == last else activation_backward(spec.activation, cache.z, g)
        parts[i] = WeightPart(dz, cache.x)
        caches[i] = None  # type: ignore[call-overload]
        g = input_grad(dz, layer) if need_input_grad or i > 0 else None
    return g, parts  # type: ignore[return-value]


def backward_weight(parts: list[WeightPart], grads: list[Grads]) -> None:
    """The W half: dJ/dW += dJ/dz xᵀ for every layer, from what `backward_input` kept.

    The same products as `backward_layers` makes, so B = I then W gives the same bits.
    """
    for i in range(len(parts) - 1, -1, -1):
        weight_grad(parts[i].dz, parts[i].x, grads[i])
        parts[i] = None  # type: ignore[call-overload]


def zero_grads(layers: list[Layer]) -> list[Grads]:
    return [
        Grads(torch.zeros_like(l.W), torch.zeros_like(l.b) if l.b is not None else None)
        for l in layers
    ]


def add_decay(layers: list[Layer], grads: list[Grads], weight_decay: float) -> None:
    """dJ/dW += lambda W, once per step (s is added once per step, not per micro-batch)."""
    if weight_decay:
        for l, g in zip(layers, grads):
            g.W.add_(l.W, alpha=weight_decay)


# ---------------------------------------------------------------- mixed precision


def compute_copies(layers: list[Layer], dtype: torch.dtype) -> list[Layer]:
    """The layers forward and backward multiply by: the masters themselves when they are
    stored in `dtype`, else (mixed precision) a copy of each in `dtype`, which lives as long
    as the masters and is refreshed after every update (`refresh_copies`)."""
    if all(l.W.dtype == dtype for l in layers):
        return layers
    return [Layer(l.index, l.W.to(dtype), None if l.b is None else l.b.to(dtype), l.rows,
                  l.cols, l.bias_owner) for l in layers]


def refresh_copies(masters: list[Layer], copies: list[Layer]) -> None:
    """Round the updated master weights into their compute copies (nothing if the same)."""
    for m, c in zip(masters, copies, strict=True):
        if c is m:
            continue
        for src, dst in zip(m.tensors(), c.tensors(), strict=True):
            dst.copy_(src)


# ---------------------------------------------------------------- optimizers
#
# One interface: step(layers, grads) updates the master weights from complete gradients,
# state_bytes(layers) is the state it keeps for them (exact, before or after it exists),
# `buffers` are those state tensors (memory.state_tensors seeds them as `optimizer`), and
# `decoupled` says whether λ is the optimizer's (AdamW) rather than part of dJ/dW.


def _flat(layers: list[Layer], grads: list[Grads]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return ([t for l in layers for t in l.tensors()], [t for g in grads for t in g.tensors()])


@dataclass
class SGD:
    """Plain SGD with optional heavy-ball momentum (buffers count as optimizer state)."""

    lr: float
    momentum: float = 0.0
    buffers: list[torch.Tensor] = field(default_factory=list)
    decoupled = False  # λW is in the gradient (finish_step adds it)

    def step(self, layers: list[Layer], grads: list[Grads]) -> None:
        params = [t for l in layers for t in l.tensors()]
        gs = [t for g in grads for t in g.tensors()]
        if self.momentum:
            if not self.buffers:
                self.buffers = [torch.zeros_like(p) for p in params]
            for p, g, buf in zip(params, gs, self.buffers):
                buf.mul_(self.momentum).add_(g)
                p.sub_(buf, alpha=self.lr)
        else:
            for p, g in zip(params, gs):
                p.sub_(g, alpha=self.lr)

    def state_bytes(self, layers: list[Layer]) -> int:
        if not self.momentum:
            return 0
        return sum(t.numel() * t.element_size() for l in layers for t in l.tensors())


@dataclass
class Adam:
    """Adam with bias correction (Kingma & Ba), as torch.optim.Adam computes it; with
    `decoupled` it is AdamW: W ← W(1 − lr·λ) before the Adam step, on the weights only
    (biases are not regularised), and λW is then not part of the gradient.

    State: a first moment m and a second moment v per parameter, in the master dtype:
    2 × the parameters' bytes. `buffers` holds every m, then every v.
    """

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW's λ (decoupled only; plain Adam's λ is in dJ/dW)
    decoupled: bool = False
    buffers: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0

    def step(self, layers: list[Layer], grads: list[Grads]) -> None:
        params, gs = _flat(layers, grads)
        n = len(params)
        if not self.buffers:
            self.buffers = [torch.zeros_like(p) for p in params + params]
        self.steps += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**self.steps)
        bc2_sqrt = (1 - b2**self.steps) ** 0.5
        decayed = {id(l.W) for l in layers} if self.decoupled and self.weight_decay else set()
        for p, g, m, v in zip(params, gs, self.buffers[:n], self.buffers[n:], strict=True):
            if id(p) in decayed:
                p.mul_(1 - self.lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = v.sqrt().div_(bc2_sqrt).add_(self.eps)  # one temporary, not two
            p.addcdiv_(m, denom, value=-step_size)

    def state_bytes(self, layers: list[Layer]) -> int:
        return 2 * sum(t.numel() * t.element_size() for l in layers for t in l.tensors())


def tensors_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def copy_tensors(masters: list[Layer], copies: list[Layer]) -> list[torch.Tensor]:
    """The tensors of the compute copies that are not the masters themselves."""
    return [t for m, c in zip(masters, copies, strict=True) if c is not m for t in c.tensors()]
