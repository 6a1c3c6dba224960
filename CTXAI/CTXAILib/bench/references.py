"""The references the engine is timed against: Captum and MONAI called as their documentation shows, on the
engine's normalised input and the raw network."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["CAPTUM", "CAPTUM_MISSING", "MONAI", "Inputs", "Reference", "captum_forward", "reference_for"]


_MONAI_OCCLUSION_BATCH = 16  # OcclusionSensitivity's own default n_batch
_MONAI_SW_BATCH = 4          # sw_batch_size of MONAI's sliding-window tutorials
CAPTUM_MISSING = {
    "gradcam_plus_plus": "Captum has no Grad-CAM++",
    "lrp": "Captum's LRP has no rules for Conv3d, BatchNorm3d or AdaptiveAvgPool3d (CTXAI's 3-D LRP is its own)",
    "confidence": "the prediction is not an attribution; Captum has no inference path",
}


@dataclass
class Reference:
    """A library's own call for one input: ``fn(x, tile)`` on one tile, or on the whole extent (``per_tile``
    False)."""

    call: str
    fn: Callable[..., Any]
    per_tile: bool = True


@dataclass
class Inputs:
    """What the reference calls get: the raw network (and its class sums for segmentation), the engine's
    normalised input over the extent, the CAM layer and the method's settings."""

    network: Any
    forward: Any
    layer: Any
    layer_name: str | None
    class_index: int
    values: dict[str, Any]
    x: Any                                  # (1, C, *extent) normalised, CPU
    extent: Any                             # Box
    patch: tuple[int, int, int]
    air: float
    spacing: tuple[float, float, float]
    overlap: float
    segmentation: bool
    device: Any

    def baseline(self, kind: str):
        from ..engine.baselines import make_baseline

        sigma = self.values.get("blur_sigma_mm", 2.0)
        return make_baseline(kind, self.x, self.air, self.spacing, sigma).to(self.device)

    def crop(self, tensor, tile):
        from ..engine.sliding import crop_padded

        return crop_padded(tensor, tile.offset([-v for v in self.extent.lo]))

    def noise(self, x) -> float:
        return float(self.values["noise"] * (x.max() - x.min()).clamp_min(1e-6))


def _unchanged(x):
    return x


def _captum_gradcam(r: Inputs) -> Reference:
    from captum.attr import LayerAttribution, LayerGradCam

    return Reference("LayerGradCam(model, layer).attribute(x, target) + LayerAttribution.interpolate(cam, "
                     "x.shape[2:], 'trilinear')",
                     lambda x, tile: LayerAttribution.interpolate(
                         LayerGradCam(r.forward, r.layer).attribute(x, target=r.class_index), tuple(x.shape[2:]),
                         "trilinear"))


def _captum_saliency(r: Inputs) -> Reference:
    from captum.attr import Saliency

    return Reference("Saliency(model).attribute(x, target)",
                     lambda x, tile: Saliency(r.forward).attribute(x, target=r.class_index))


def _captum_integrated_gradients(r: Inputs) -> Reference:
    from captum.attr import IntegratedGradients

    baseline, steps = r.baseline(r.values["baseline"]), r.values["steps"]
    return Reference(f"IntegratedGradients(model).attribute(x, baselines, target, n_steps={steps})",
                     lambda x, tile: IntegratedGradients(r.forward).attribute(
                         x, baselines=r.crop(baseline, tile), target=r.class_index, n_steps=steps))


def _captum_smoothgrad(r: Inputs) -> Reference:
    from captum.attr import NoiseTunnel, Saliency

    samples = r.values["samples"]
    return Reference(f"NoiseTunnel(Saliency(model)).attribute(x, nt_type='smoothgrad', nt_samples={samples}, "
                     "stdevs, target)",
                     lambda x, tile: NoiseTunnel(Saliency(r.forward)).attribute(
                         x, nt_type="smoothgrad", nt_samples=samples, stdevs=r.noise(x), target=r.class_index))


def _captum_gradient_shap(r: Inputs) -> Reference:
    import torch
    from captum.attr import GradientShap

    from ..engine.baselines import baseline_distribution

    samples = r.values["samples"]
    distribution = baseline_distribution(r.baseline, r.values["baselines"], torch.Generator().manual_seed(0))
    return Reference(f"GradientShap(model).attribute(x, baselines, n_samples={samples}, stdevs, target)",
                     lambda x, tile: GradientShap(r.forward).attribute(
                         x, baselines=r.crop(distribution, tile), n_samples=samples, stdevs=r.noise(x),
                         target=r.class_index))


def _captum_deeplift(r: Inputs) -> Reference:
    from captum.attr import DeepLift

    baseline = r.baseline(r.values["baseline"])
    return Reference("DeepLift(model).attribute(x, baselines, target)",
                     lambda x, tile: DeepLift(r.forward).attribute(x, baselines=r.crop(baseline, tile),
                                                                   target=r.class_index))


def _captum_lime(r: Inputs) -> Reference | str:
    if r.segmentation:
        return ("Captum's Lime perturbs one model input; the U-Net takes 64³ tiles, and a tiled forward would be "
                "CTXAI's own sliding window, not Captum's")
    import torch
    from captum.attr import Lime

    from ..engine.supervoxels import supervoxels

    fill, samples = r.baseline(r.values["fill"]), r.values["samples"]
    mask = torch.from_numpy(supervoxels(r.x[0].numpy(), r.spacing, r.values["supervoxels"],
                                        r.values["compactness"]))[None, None].to(r.device)
    return Reference(f"Lime(model).attribute(x, target, feature_mask=<the same supervoxels>, n_samples={samples}, "
                     "baselines)",
                     lambda x, tile: Lime(r.forward).attribute(x, target=r.class_index, feature_mask=mask,
                                                               n_samples=samples, baselines=fill), per_tile=False)


def _captum_occlusion(r: Inputs) -> Reference:
    from captum.attr import Occlusion

    fill, channels = r.baseline(r.values["fill"]), r.x.shape[1]
    window, stride = (channels,) + (r.values["window"],) * 3, (channels,) + (r.values["stride"],) * 3
    return Reference(f"Occlusion(model).attribute(x, sliding_window_shapes={window}, strides={stride}, baselines, "
                     "target)",
                     lambda x, tile: Occlusion(r.forward).attribute(x, sliding_window_shapes=window, strides=stride,
                                                                    baselines=fill, target=r.class_index),
                     per_tile=False)


CAPTUM: dict[str, Callable[[Inputs], Reference | str]] = {
    "gradcam": _captum_gradcam, "saliency": _captum_saliency, "integrated_gradients": _captum_integrated_gradients,
    "smoothgrad": _captum_smoothgrad, "gradient_shap": _captum_gradient_shap, "deeplift": _captum_deeplift,
    "lime": _captum_lime, "occlusion": _captum_occlusion}


def _monai_cam(kind: str) -> Callable[[Inputs], Reference | str]:
    def build(r: Inputs) -> Reference | str:
        if kind == "GradCAMpp" and r.segmentation:
            return ("MONAI's GradCAMpp takes one score per image: on a segmentation output its score and gradient "
                    "shapes do not match")
        from monai import visualize

        # Postprocessing left out: MONAI's default normaliser rescales (and inverts) the map. MONAI's hooks stay
        # on the module for good, so it gets its own copy of the network. Its backward hook needs a gradient
        # upstream of the layer and the parameters are frozen, so the input requires one.
        cam = getattr(visualize, kind)(nn_module=copy.deepcopy(r.network), target_layers=r.layer_name,
                                       postprocessing=_unchanged)
        return Reference(f"{kind}(nn_module=model, target_layers={r.layer_name!r}, postprocessing=identity)"
                         "(x.requires_grad_(), class_idx)",
                         lambda x, tile: cam(x=x.requires_grad_(True), class_idx=r.class_index))
    return build


def _monai_saliency(r: Inputs) -> Reference:
    from monai.visualize import VanillaGrad

    grad = VanillaGrad(copy.deepcopy(r.network))
    return Reference("VanillaGrad(model)(x, index)", lambda x, tile: grad(x, index=r.class_index))


def _monai_smoothgrad(r: Inputs) -> Reference:
    from monai.visualize import SmoothGrad

    samples = r.values["samples"]
    smooth = SmoothGrad(copy.deepcopy(r.network), stdev_spread=r.values["noise"], n_samples=samples, verbose=False)
    return Reference(f"SmoothGrad(model, stdev_spread, n_samples={samples}, verbose=False)(x, index)",
                     lambda x, tile: smooth(x, index=r.class_index))


def _monai_occlusion(r: Inputs) -> Reference:
    from monai.visualize import OcclusionSensitivity

    window, stride = r.values["window"], r.values["stride"]
    overlap = 1.0 - stride / window  # MONAI steps by mask_size * (1 - overlap): the same windows as ours
    occlusion = OcclusionSensitivity(nn_module=copy.deepcopy(r.network), mask_size=window, overlap=overlap,
                                     mode="mean_img", n_batch=_MONAI_OCCLUSION_BATCH, verbose=False)
    return Reference(f"OcclusionSensitivity(nn_module=model, mask_size={window}, overlap={overlap:g}, "
                     f"mode='mean_img', n_batch={_MONAI_OCCLUSION_BATCH} (its default), verbose=False)(x)",
                     lambda x, tile: occlusion(x)[0], per_tile=False)


def _monai_confidence(r: Inputs) -> Reference:
    import torch
    from monai.inferers import sliding_window_inference

    def predict(x, tile):
        with torch.no_grad():
            return torch.softmax(sliding_window_inference(x, roi_size=r.patch, sw_batch_size=_MONAI_SW_BATCH,
                                                          predictor=r.network, overlap=r.overlap, mode="gaussian"),
                                 dim=1)

    return Reference(f"sliding_window_inference(x, roi_size={r.patch}, sw_batch_size={_MONAI_SW_BATCH}, "
                     f"predictor=model, overlap={r.overlap}, mode='gaussian') + softmax, under torch.no_grad()",
                     predict, per_tile=False)


MONAI: dict[str, Callable[[Inputs], Reference | str]] = {
    "gradcam": _monai_cam("GradCAM"), "gradcam_plus_plus": _monai_cam("GradCAMpp"), "saliency": _monai_saliency,
    "smoothgrad": _monai_smoothgrad, "occlusion": _monai_occlusion, "confidence": _monai_confidence}


def reference_for(library: dict, missing: dict[str, str], name: str, label: str, method: str,
                  inputs: Inputs) -> Reference | str:
    """The library's reference for ``method``, or why there is none."""
    if method not in library:
        return missing.get(method, f"{name} has no {label}")
    return library[method](inputs)


def captum_forward(network, segmentation: bool):
    """The model as Captum's documentation calls it: the raw network, or for segmentation each class's logits
    summed over the voxels (its tutorial's wrapper), so that ``target=class_index`` explains the whole tile."""
    import torch

    if not segmentation:
        return network

    class ClassSums(torch.nn.Module):  # a module, not a function: DeepLift hooks the modules it is given
        def __init__(self):
            super().__init__()
            self.network = network

        def forward(self, x):
            return self.network(x).flatten(2).sum(2)

    return ClassSums()
