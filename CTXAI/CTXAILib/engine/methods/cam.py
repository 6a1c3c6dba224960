"""Class activation maps on 3-D feature maps: Grad-CAM, Grad-CAM++, HiResCAM, LayerCAM and guided Grad-CAM.

Grad-CAM and guided Grad-CAM are Captum's. Captum has no Grad-CAM++, HiResCAM or LayerCAM, so those three weight
the layer's activations and gradients (taken with Captum's layer-gradient helper, one forward and one backward
pass) with their published formulas. Every map is upsampled trilinearly to the input tile; tiles are blended.
"""

from __future__ import annotations

import torch
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum.attr import GuidedGradCam, LayerActivation, LayerAttribution, LayerGradCam

from .registry import MethodSpec, Setting, TileContext, register

__all__: list[str] = []

_UPSAMPLE = Setting("upsample", "choice", "trilinear", "How the layer-resolution map is brought to voxels.",
                    choices=("trilinear", "nearest"))


def _spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def _to_input(cam: torch.Tensor, ctx: TileContext, settings: dict) -> torch.Tensor:
    return LayerAttribution.interpolate(cam, tuple(ctx.x.shape[2:]), settings["upsample"])[0]


def _layer_gradients(ctx: TileContext) -> tuple[torch.Tensor, torch.Tensor]:
    grads, acts = compute_layer_gradients_and_eval(ctx.score, ctx.layer, ctx.x)
    return grads[0].detach(), acts[0].detach()


def gradcam_statistics(ctx: TileContext, settings: dict) -> torch.Tensor:
    """Per channel, the tile's sum of target gradients over the layer's positions; last entry: the positions."""
    grads, _ = _layer_gradients(ctx)
    return torch.cat([grads.sum(dim=(0,) + _spatial(grads)), torch.tensor([grads[0, 0].numel()],
                                                                          dtype=grads.dtype, device=grads.device)])


def gradcam(ctx: TileContext, settings: dict) -> torch.Tensor:
    if ctx.statistics is None:  # one tile: Captum's Grad-CAM
        cam = LayerGradCam(ctx.score, ctx.layer).attribute(ctx.x, relu_attributions=True)
        return _to_input(cam, ctx, settings)
    # Several tiles: the channel weights are the whole target's average gradients, as on one big feature map.
    weights = (ctx.statistics[:-1] / ctx.statistics[-1]).to(ctx.x.device)
    with torch.no_grad():
        acts = LayerActivation(ctx.score, ctx.layer).attribute(ctx.x)
    cam = (weights[None, :, None, None, None] * acts).sum(dim=1, keepdim=True).clamp_min(0)
    return _to_input(cam, ctx, settings)


def gradcam_plus_plus(ctx: TileContext, settings: dict) -> torch.Tensor:
    # Chattopadhay et al. 2018, eq. 19 with the exponential score's closed-form higher derivatives.
    grads, acts = _layer_gradients(ctx)
    g2, g3 = grads.pow(2), grads.pow(3)
    denominator = 2 * g2 + acts.sum(dim=_spatial(acts), keepdim=True) * g3
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    weights = (alpha * grads.clamp_min(0)).sum(dim=_spatial(grads), keepdim=True)
    cam = (weights * acts).sum(dim=1, keepdim=True).clamp_min(0)
    return _to_input(cam, ctx, settings)


def hirescam(ctx: TileContext, settings: dict) -> torch.Tensor:
    # Draelos and Carin 2020: element-wise gradient x activation, so the map shows where the score was computed.
    grads, acts = _layer_gradients(ctx)
    cam = (grads * acts).sum(dim=1, keepdim=True).clamp_min(0)
    return _to_input(cam, ctx, settings)


def layercam(ctx: TileContext, settings: dict) -> torch.Tensor:
    # Jiang et al. 2021: positive gradients weight each activation where it is, not by a channel average.
    grads, acts = _layer_gradients(ctx)
    cam = (grads.clamp_min(0) * acts).sum(dim=1, keepdim=True).clamp_min(0)
    return _to_input(cam, ctx, settings)


def guided_gradcam(ctx: TileContext, settings: dict) -> torch.Tensor:
    return GuidedGradCam(ctx.score, ctx.layer).attribute(ctx.x, interpolate_mode=settings["upsample"])[0]


def _cam(name: str, label: str, summary: str, kernel, samples: float = 1.0, sign: str = "magnitude",
         statistics=None) -> None:
    # CAMs are cut at zero (ReLU), so "magnitude" unless the kernel keeps a sign.
    register(MethodSpec(name, label, "cam", summary, sign=sign, aggregation="blend", kernel=kernel,
                        samples=lambda s, shape: samples, settings=(_UPSAMPLE,), needs_layer=True,
                        needs_hooks=True, statistics=statistics))


# Grad-CAM and Grad-CAM++ weight whole channels: for a segmentation target they light up every region with the
# class's features (other pores, channels), not only the selected defect. Their summaries say so.
_GLOBAL = " For a segmentation target it shows every region with the class's features; use HiResCAM or LayerCAM there."
_cam("gradcam", "Grad-CAM", "Layer activations weighted by their average gradient, positive part "
     "(Selvaraju et al. 2017)." + _GLOBAL, gradcam, statistics=gradcam_statistics)
_cam("gradcam_plus_plus", "Grad-CAM++", "Grad-CAM with pixel-wise gradient weights that separate several "
     "instances of a class (Chattopadhay et al. 2018)." + _GLOBAL, gradcam_plus_plus)
_cam("hirescam", "HiResCAM", "Element-wise gradient x activation summed over channels: faithful to where the score "
     "was computed (Draelos and Carin 2020).", hirescam)
_cam("layercam", "LayerCAM", "Activations weighted by their positive gradients per location (Jiang et al. 2021).",
     layercam)
_cam("guided_gradcam", "Guided Grad-CAM", "Guided backprop multiplied by the upsampled Grad-CAM: fine detail "
     "inside the Grad-CAM region (Selvaraju et al. 2017).", guided_gradcam, samples=2.0,
     sign="sensitivity")  # guided backprop (a direction of change) times a non-negative CAM
