"""models.layers.SpectralNorm: torch's spectral norm, bit for bit on NCHW weights, without copying NHWC ones."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm
from torch.utils._python_dispatch import TorchDispatchMode

from models.layers import spectral_norm

LAYERS = {
    "conv3x3": lambda: nn.Conv2d(24, 40, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(24, 40, 1),
    "linear": lambda: nn.Linear(24, 40),
    "embedding": lambda: nn.Embedding(10, 24),
}


def pair(kind: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same layer spectral-normed by torch and by us, from the same weight and random state."""
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    theirs, ours = copy.deepcopy(layer), copy.deepcopy(layer)
    state = torch.get_rng_state()
    torch_spectral_norm(theirs, n_power_iterations=1, eps=1e-6)
    torch.set_rng_state(state)
    spectral_norm(ours, n_power_iterations=1, eps=1e-6)
    return theirs, ours


def sn_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items() if "parametrizations" in k}


def train_steps(layer: nn.Module, steps: int = 3) -> list[torch.Tensor]:
    """Normalised weights of ``steps`` training forwards, the weight moved between them."""
    weights = []
    for step in range(steps):
        weights.append(layer.weight.detach().clone())
        with torch.no_grad():
            original = layer.parametrizations.weight.original
            original.add_(torch.full_like(original, 0.01 * (step + 1)).sin())
    return weights


@pytest.mark.parametrize("kind", LAYERS)
def test_on_standard_layouts_it_is_torchs_spectral_norm_bit_for_bit(kind):
    theirs, ours = pair(kind)
    assert sn_state(theirs).keys() == sn_state(ours).keys()
    for key, value in sn_state(theirs).items():
        assert torch.equal(value, sn_state(ours)[key]), key  # the same start: u, v and 15 iterations
    for a, b in zip(train_steps(theirs), train_steps(ours), strict=True):
        assert torch.equal(a, b)
    for key, value in sn_state(theirs).items():
        assert torch.equal(value, sn_state(ours)[key]), key
    theirs.eval(), ours.eval()
    assert torch.equal(theirs.weight, ours.weight)


def test_an_nhwc_weight_gives_the_same_weights_and_vectors_in_the_standard_order():
    _, standard = pair("conv3x3")
    nhwc = copy.deepcopy(standard).to(memory_format=torch.channels_last)
    assert nhwc.parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(train_steps(standard, 5), train_steps(nhwc, 5), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key, value in sn_state(standard).items():  # v is kept in (in, kh, kw) order in either layout
        torch.testing.assert_close(value.contiguous(), sn_state(nhwc)[key].contiguous(), rtol=1e-5, atol=1e-7)
    # a state saved from the NHWC layer means the same to an NCHW one, and to torch's spectral norm
    theirs, loaded = pair("conv3x3", seed=1)
    theirs.load_state_dict(nhwc.state_dict())
    loaded.load_state_dict(nhwc.state_dict())
    for layer in (nhwc, theirs, loaded):
        layer.eval()
    torch.testing.assert_close(theirs.weight, nhwc.weight.contiguous(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loaded.weight, nhwc.weight.contiguous(), rtol=1e-5, atol=1e-7)


class WeightSizedCopies(TorchDispatchMode):
    """Counts the ops that copy a whole tensor of ``numel`` elements (copy_, clone, contiguous...)."""

    COPIES = frozenset(
        {"copy_", "clone", "_to_copy", "_unsafe_view", "_reshape_alias", "reshape", "contiguous"}
    )

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.COPIES and isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.copies.append(name)
        return out


@pytest.mark.parametrize("training", [True, False])
def test_an_nhwc_conv_weight_is_not_copied_to_take_its_norm(training):
    theirs, ours = (layer.to(memory_format=torch.channels_last).train(training) for layer in pair("conv3x3"))
    numel = ours.parametrizations.weight.original.numel()
    counts = {}
    for name, layer in (("torch", theirs), ("ours", ours)):
        with WeightSizedCopies(numel) as mode:
            weight = layer.weight
            weight.backward(torch.ones_like(weight))  # an NHWC gradient, as a convolution's backward gives
        counts[name] = mode.copies
    assert counts["torch"] and not counts["ours"], counts  # torch's flatten(1) copies the NHWC weight
    assert ours.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize(("kind", "nhwc"), [*((kind, False) for kind in LAYERS), ("conv3x3", True)])
def test_the_gradient_is_torchs_through_the_weight_and_its_norm(kind, nhwc):
    """The closed-form gradient of W / σ(W) equals autograd's through torch's spectral norm, σ's
    dependence on W included."""
    theirs, ours = (layer.double() for layer in pair(kind))
    if nhwc:
        theirs, ours = (layer.to(memory_format=torch.channels_last) for layer in (theirs, ours))
    original = "parametrizations.weight.original"
    torch.manual_seed(1)  # not proportional to the weight, so σ's term matters; in the weight's layout
    upstream = torch.randn_like(theirs.get_parameter(original))
    for layer in (theirs, ours):
        layer.weight.backward(upstream)  # one training-mode forward each: one power iteration each
    grad_theirs, grad_ours = (layer.get_parameter(original).grad for layer in (theirs, ours))
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-10, atol=1e-12)
    sigma = torch.linalg.matrix_norm(theirs.get_parameter(original).detach().flatten(1), ord=2)
    direct = upstream / sigma
    assert not torch.allclose(grad_theirs, direct, rtol=1e-3)  # the test would see σ's term missing


def test_a_second_derivative_through_the_norm_raises_instead_of_missing_terms():
    """The closed-form backward is differentiable once: a penalty on weight gradients, which needs the
    second derivative, gets an error rather than a gradient without σ's terms."""
    _, ours = (layer.double() for layer in pair("conv3x3"))
    original = ours.parametrizations.weight.original
    (grad,) = torch.autograd.grad(ours.weight.square().sum(), original, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.square().sum().backward()
