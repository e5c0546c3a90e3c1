"""DP-SGD's clipped gradient sum in one backward pass, for the layers the project's models use.

DP-SGD clips every example's gradient to norm C and sums them; Opacus then adds the noise,
scales and steps, and its accountant counts the step. Opacus's generic modes get there
through Python hooks on every layer and per-example gradients of every weight. For a
linear layer neither is needed (Bu et al., ICML 2023, "book-keeping"; Li et al., ICLR 2022,
"ghost norm"): with input a_i and output gradient g_i of example i, the per-example weight
gradient is the outer product g_i a_iᵀ, so its norm is ‖g_i‖·‖a_i‖ and the clipped sum is
one matrix product Σ c_i g_i a_iᵀ, the cost of the ordinary weight gradient. The two conv
layers and the GroupNorms are small (72, 1,152 and 48 weights), so their per-example
gradients are formed outright (a conv's as one grouped convolution over the batch, or from
the input's shifted slices with one input channel), and joined into one matrix whose
norms and clipped sum take one product each.

Here one forward pass keeps each layer's input and output (forward hooks), one
`torch.autograd.grad` of the summed loss gives the gradients with respect to the layer
outputs (autograd then skips the batch weight gradients), and `clipped_sum` returns, per
parameter, Σ_i min(1, C / (‖∇_i‖ + 1e-6)) ∇_i with ∇_i example i's whole-model gradient:
Opacus's `DPOptimizer.clip_and_accumulate` formula. The trainer hands that sum to
Opacus's `DPOptimizerFastGradientClipping` (noise, scaling, accounting) and compares it
with Opacus `hooks` + `DPOptimizer` clipping on its first step.

`supports(model)` says whether every trainable parameter is in a layer handled here; any
other model trains with an Opacus mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

# Opacus's clip factor: min(1, C / (norm + 1e-6)).
_NORM_EPS = 1e-6


@dataclass(frozen=True)
class _Grads:
    """A linear layer's per-example squared gradient norms and a way to sum them clipped."""

    sq_norms: torch.Tensor  # (batch,)
    clipped: Callable[[torch.Tensor], list[torch.Tensor]]  # clip factors -> [weight, bias]


def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> _Grads:
    g_sq = g.pow(2).sum(1)
    sq = g_sq * a.pow(2).sum(1) + (g_sq if layer.bias is not None else 0)

    def clipped(c: torch.Tensor) -> list[torch.Tensor]:
        cg = g * c.unsqueeze(1)
        return [cg.t() @ a, cg.sum(0)]

    return _Grads(sq, clipped)


def _conv2d(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    n = len(a)
    if layer.in_channels == 1:
        w = _conv_weights_from_slices(layer, a, g)
    else:
        # Per-example weight gradients as one grouped convolution's weight gradient: the
        # batch becomes the groups (faster here than unfold + bmm, which forms every patch).
        w = torch.nn.grad.conv2d_weight(
            a.reshape(1, -1, *a.shape[2:]),
            (n * layer.out_channels, *layer.weight.shape[1:]),
            g.reshape(1, -1, *g.shape[2:]),
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=n,
        ).view(n, -1)
    return [w, g.flatten(2).sum(2)] if layer.bias is not None else [w]


def _conv_weights_from_slices(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example conv weight gradients as one batched product with the input's patches.

    The patches are the kernel's shifted, strided slices of the zero-padded input, stacked in
    the weight's (in channel, kernel row, kernel column) order. With one input channel this
    was 1.7x faster here than the grouped convolution (which wins from 8 channels on).
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        layer.kernel_size, layer.stride, layer.padding, layer.dilation
    )  # fmt: skip
    n, h, w = len(a), g.shape[2], g.shape[3]
    padded = F.pad(a, (pw, pw, ph, ph))
    rows = [slice(i * dh, i * dh + sh * (h - 1) + 1, sh) for i in range(kh)]
    cols = [slice(j * dw, j * dw + sw * (w - 1) + 1, sw) for j in range(kw)]
    # (n, in channels, kh * kw, h, w)
    patches = torch.stack([padded[:, :, r, c] for r in rows for c in cols], dim=2)
    return torch.bmm(g.flatten(2), patches.view(n, -1, h * w).transpose(1, 2)).view(n, -1)


def _group_norm(layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    normed = F.group_norm(a, layer.num_groups, eps=layer.eps).flatten(2)
    g = g.flatten(2)
    return [(g * normed).sum(2), g.sum(2)]


# A rule gives a linear layer's `_Grads`, or the per-example gradients of a small layer's
# parameters outright, (batch, parameter size) each, in `_params` order.
_Rule = Callable[..., "_Grads | list[torch.Tensor]"]
_RULES: dict[type[nn.Module], tuple[Callable[[nn.Module], bool], _Rule]] = {
    nn.Linear: (lambda m: True, _linear),
    nn.Conv2d: (
        lambda m: m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str),
        _conv2d,
    ),
    nn.GroupNorm: (lambda m: m.affine, _group_norm),
}


def trainable_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that own trainable parameters directly."""
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def _params(layer: nn.Module) -> list[nn.Parameter]:
    """The layer's trainable parameters, weight then bias (the order the rules return)."""
    return [p for p in (layer.weight, getattr(layer, "bias", None)) if p is not None]


def supports(model: nn.Module) -> bool:
    """True if every trainable parameter is a weight or bias of a layer handled here."""
    return not uncovered(model)


def uncovered(model: nn.Module) -> list[str]:
    """The layers with trainable parameters not handled here, as 'name (Type)'."""
    owners = {id(m) for m in trainable_layers(model)}
    out = []
    for name, layer in model.named_modules():
        if id(layer) not in owners:
            continue
        rule = _RULES.get(type(layer))
        trainable = {id(p) for p in layer.parameters(recurse=False) if p.requires_grad}
        # not a rule's layer, one its rule does not cover, or e.g. a frozen weight
        if rule is None or not rule[0](layer) or trainable != {id(p) for p in _params(layer)}:
            out.append(f"{name or 'the model'} ({type(layer).__name__})")
    return out


@contextmanager
def _capturing(layers: list[nn.Module]) -> Iterator[dict[nn.Module, tuple]]:
    captured: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured[module] = (inputs[0].detach(), output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class ClippedStep:
    """One batch: its mean loss, each example's gradient norm, each parameter's clipped sum."""

    loss: torch.Tensor
    norms: torch.Tensor
    sums: dict[nn.Parameter, torch.Tensor]


def clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    max_grad_norm: float,
    *,
    layers: list[nn.Module] | None = None,
) -> ClippedStep:
    """Σ_i clip(∇_i) for every parameter, ∇_i the gradient of example i's cross-entropy.

    The model must pass `supports`; linear layers need 2-D inputs (the models flatten first).
    An empty batch (Poisson sampling draws them) gives zero sums. `layers` is
    `trainable_layers(model)`, for a caller that takes many steps to compute once.
    """
    layers = trainable_layers(model) if layers is None else layers
    if len(y) == 0:
        return ClippedStep(
            x.new_zeros(()),
            x.new_zeros((0,)),
            {p: torch.zeros_like(p) for layer in layers for p in _params(layer)},
        )
    with _capturing(layers) as captured:
        logits = model(x)
    loss_sum = F.cross_entropy(logits, y, reduction="sum")
    grads_out = torch.autograd.grad(loss_sum, [captured[layer][1] for layer in layers])
    per_layer = []
    for layer, g in zip(layers, grads_out, strict=True):
        a = captured[layer][0]
        if isinstance(layer, nn.Linear) and a.dim() != 2:
            raise ValueError("clipped_grads needs 2-D inputs to linear layers")
        per_layer.append(_RULES[type(layer)][1](layer, a, g))
    norms, sums = _clip(layers, per_layer, max_grad_norm)
    return ClippedStep(loss_sum.detach() / len(y), norms, sums)


def _clip(
    layers: list[nn.Module], per_layer: list, max_grad_norm: float
) -> tuple[torch.Tensor, dict[nn.Parameter, torch.Tensor]]:
    """Every example's whole-model norm, and every parameter's sum of clipped gradients.

    The small layers' per-example gradients are joined into one (batch, size) matrix, so
    their norms and their clipped sums take one product each.
    """
    pairs = list(zip(layers, per_layer, strict=True))
    ghosts = [(layer, r) for layer, r in pairs if isinstance(r, _Grads)]
    owned = [
        (p, block)
        for layer, r in pairs
        if not isinstance(r, _Grads)
        for p, block in zip(_params(layer), r, strict=True)
    ]
    joined = torch.cat([block for _, block in owned], 1) if owned else None
    squares = [r.sq_norms for _, r in ghosts]
    if joined is not None:
        squares.append((joined * joined).sum(1))
    norms = torch.stack(squares).sum(0).sqrt()
    factors = (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)
    found: dict[nn.Parameter, torch.Tensor] = {}
    if joined is not None:
        flat = factors @ joined
        for (p, _), s in zip(owned, flat.split([b.shape[1] for _, b in owned]), strict=True):
            found[p] = s.view_as(p)
    for layer, r in ghosts:
        for p, s in zip(_params(layer), r.clipped(factors), strict=False):
            found[p] = s
    # In the layers' parameter order; a parameter without a sum is a KeyError, never a guess.
    return norms, {p: found[p] for layer in layers for p in _params(layer)}
