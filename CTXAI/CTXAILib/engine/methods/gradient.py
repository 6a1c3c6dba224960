"""Gradient-family methods, all through Captum: saliency, input x gradient, Integrated Gradients, SmoothGrad,
GradientSHAP, DeepLIFT, DeepSHAP and guided backprop.

Each kernel explains one tile and is linear in the target, so tiles add up exactly (``aggregation="sum"``).
Saliency and SmoothGrad keep the signed gradient per tile and take the magnitude after summing (``absolute``),
because |a| + |b| is not |a + b|.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from captum.attr import (DeepLift, DeepLiftShap, GradientShap, GuidedBackprop, InputXGradient, IntegratedGradients,
                         NoiseTunnel, Saliency)
from torch import nn

from ...errors import MethodError
from ..baselines import BASELINES, baseline_distribution
from .registry import MethodSpec, Setting, TileContext, register

__all__: list[str] = []

# A defect-free part is the reference an NDT question implies ("what here differs from sound metal?"); air would
# credit the bright metal around a pore rather than the pore.
_BASELINE = Setting("baseline", "choice", "part_mean", "Reference input: a defect-free part (part_mean), all air, "
                    "the blurred input, or zeros in normalised units.", choices=BASELINES)
_SIGMA = Setting("blur_sigma_mm", "float", 2.0, "Gaussian width of the blurred baseline, in mm.",
                 minimum=0.01, maximum=100.0)
_NOISE = Setting("noise", "float", 0.1, "Noise standard deviation as a fraction of the input's value range.",
                 minimum=0.0, maximum=2.0)


def _baseline(ctx: TileContext, settings: dict) -> torch.Tensor:
    return ctx.baseline(settings["baseline"], settings["blur_sigma_mm"])


def _distribution(ctx: TileContext, settings: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(ctx.seed)
    return baseline_distribution(lambda kind: ctx.baseline(kind, settings["blur_sigma_mm"]),
                                 settings["baselines"], generator)


def _noise_std(x: torch.Tensor, fraction: float) -> float:
    return float(fraction * (x.max() - x.min()).clamp_min(1e-6))


def _chunks(total: int, size: int) -> list[int]:
    size = max(1, size)
    return [size] * (total // size) + ([total % size] if total % size else [])


@contextlib.contextmanager
def _seeded(ctx: TileContext) -> Iterator[None]:
    """Captum draws noise from torch's global generator: fork it so runs are reproducible and leave no trace."""
    with torch.random.fork_rng(devices=[ctx.x.device] if ctx.x.device.type == "cuda" else []):
        torch.manual_seed(ctx.seed)
        yield


def saliency(ctx: TileContext, settings: dict) -> torch.Tensor:
    return Saliency(ctx.score).attribute(ctx.x, abs=False)[0]


def input_x_gradient(ctx: TileContext, settings: dict) -> torch.Tensor:
    return InputXGradient(ctx.score).attribute(ctx.x)[0]


def integrated_gradients(ctx: TileContext, settings: dict) -> torch.Tensor:
    return IntegratedGradients(ctx.score).attribute(
        ctx.x, baselines=_baseline(ctx, settings), n_steps=settings["steps"], method=settings["integration"],
        internal_batch_size=ctx.batch_size)[0]


def smoothgrad(ctx: TileContext, settings: dict) -> torch.Tensor:
    with _seeded(ctx):
        return NoiseTunnel(Saliency(ctx.score)).attribute(
            ctx.x, nt_type="smoothgrad", nt_samples=settings["samples"], nt_samples_batch_size=ctx.batch_size,
            stdevs=_noise_std(ctx.x, settings["noise"]), abs=False)[0]


def gradient_shap(ctx: TileContext, settings: dict) -> torch.Tensor:
    # Captum's GradientShap evaluates all samples in one batch; chunk them to the memory budget and average.
    baselines = _distribution(ctx, settings)
    method = GradientShap(ctx.score)
    total = torch.zeros_like(ctx.x)
    with _seeded(ctx):
        for chunk in _chunks(settings["samples"], ctx.batch_size):
            total += chunk * method.attribute(ctx.x, baselines=baselines, n_samples=chunk,
                                              stdevs=_noise_std(ctx.x, settings["noise"]))
    return (total / settings["samples"])[0]


# Which modules a network calls more than once per forward: found once per network (an extra hooked forward pass
# would otherwise double the cost of every DeepLIFT run).
_REUSED: "weakref.WeakKeyDictionary[nn.Module, list[str]]" = weakref.WeakKeyDictionary()


def _check_single_use(ctx: TileContext, method: str) -> None:
    """DeepLIFT keeps one reference activation per module: a module called twice per forward corrupts it."""
    network = ctx.model.module
    if network not in _REUSED:
        calls: dict[str, int] = {}
        handles = []
        for name, module in network.named_modules():
            if name and not list(module.children()):
                handles.append(module.register_forward_hook(
                    lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1)))
        try:
            with torch.no_grad():
                network(ctx.x)
        finally:
            for handle in handles:
                handle.remove()
        _REUSED[network] = sorted(name for name, count in calls.items() if count > 1)
    reused = _REUSED[network]
    if reused:
        raise MethodError(f"{method} cannot explain this model: module(s) {', '.join(reused)} are called more than "
                          "once per forward pass, which breaks DeepLIFT's reference activations. Use Integrated "
                          "Gradients (same idea, no such restriction), or give each use its own module.")


def deeplift(ctx: TileContext, settings: dict) -> torch.Tensor:
    _check_single_use(ctx, "DeepLIFT")
    return DeepLift(ctx.score).attribute(ctx.x, baselines=_baseline(ctx, settings))[0]


def deepshap(ctx: TileContext, settings: dict) -> torch.Tensor:
    _check_single_use(ctx, "DeepSHAP")
    return DeepLiftShap(ctx.score).attribute(ctx.x, baselines=_distribution(ctx, settings))[0]


def guided_backprop(ctx: TileContext, settings: dict) -> torch.Tensor:
    return GuidedBackprop(ctx.score).attribute(ctx.x)[0]


def _one(settings: dict, shape: tuple) -> float:
    return 1.0


register(MethodSpec(
    "saliency", "Saliency", "gradient", "Magnitude of the target's gradient per voxel (Simonyan et al. 2014).",
    sign="magnitude", absolute=True, aggregation="sum", kernel=saliency, samples=_one))
register(MethodSpec(
    "input_x_gradient", "Input x gradient", "gradient", "Gradient times the normalised input per voxel.",
    # Relative to the all-zero input (air under a window normalisation): the first-order share of f(x) - f(0).
    sign="attribution", aggregation="sum", kernel=input_x_gradient, samples=_one))
register(MethodSpec(
    "integrated_gradients", "Integrated Gradients", "gradient",
    "Gradients integrated along the straight path from a baseline to the input (Sundararajan et al. 2017); "
    "the map sums to f(input) - f(baseline).",
    sign="attribution", aggregation="sum", kernel=integrated_gradients,
    samples=lambda s, shape: float(s["steps"]),
    settings=(Setting("steps", "int", 32, "Integration steps along the path (more: closer to completeness).",
                      minimum=2, maximum=1024),
              _BASELINE, _SIGMA,
              Setting("integration", "choice", "gausslegendre", "Quadrature rule for the path integral.",
                      choices=("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left",
                               "riemann_right")))))
register(MethodSpec(
    "smoothgrad", "SmoothGrad", "gradient",
    "Gradient averaged over noisy copies of the input (Smilkov et al. 2017); shows the magnitude.",
    sign="magnitude", absolute=True, aggregation="sum", kernel=smoothgrad,
    samples=lambda s, shape: float(s["samples"]),
    settings=(Setting("samples", "int", 16, "Noisy copies averaged.", minimum=1, maximum=1024), _NOISE)))
register(MethodSpec(
    "gradient_shap", "GradientSHAP", "gradient",
    "Expected gradients over random points between noisy input copies and a distribution of baselines "
    "(Lundberg and Lee 2017).",
    sign="attribution", aggregation="sum", kernel=gradient_shap,
    samples=lambda s, shape: float(s["samples"]),
    settings=(Setting("samples", "int", 16, "Random samples averaged.", minimum=1, maximum=1024),
              Setting("baselines", "int", 6, "Baselines in the reference distribution (air, part mean, blurred, "
                      "each with a little noise).", minimum=1, maximum=64),
              _NOISE, _SIGMA)))
register(MethodSpec(
    "deeplift", "DeepLIFT", "gradient",
    "Differences from a baseline propagated with the rescale rule (Shrikumar et al. 2017).",
    sign="attribution", aggregation="sum", kernel=deeplift, samples=lambda s, shape: 2.0, needs_hooks=True,
    settings=(_BASELINE, _SIGMA)))
register(MethodSpec(
    "deepshap", "DeepSHAP", "gradient",
    "DeepLIFT averaged over a distribution of baselines: approximate SHAP values (Lundberg and Lee 2017).",
    sign="attribution", aggregation="sum", kernel=deepshap, samples=lambda s, shape: 2.0 * s["baselines"],
    needs_hooks=True,
    settings=(Setting("baselines", "int", 6, "Baselines in the reference distribution.", minimum=2, maximum=64),
              _SIGMA)))
register(MethodSpec(
    "guided_backprop", "Guided backprop", "gradient",
    "Gradient with negative signals stopped at every ReLU (Springenberg et al. 2015).",
    # A gradient (with ReLU-gated back signals) says which way the score moves, not for/against.
    sign="sensitivity", aggregation="sum", kernel=guided_backprop, samples=_one, needs_hooks=True))
