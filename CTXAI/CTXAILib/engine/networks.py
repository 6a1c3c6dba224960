"""The project's own 3-D networks: a defect classifier for ROI patches and a U-Net for defect segmentation.

Both are built so that every attribution method has something real to work on: Conv3d + BatchNorm3d blocks, one
``nn.ReLU`` module per use (guided backprop and DeepLIFT hook modules, and a shared module would be hooked twice),
no in-place activations (hooks need the pre-activation values), and named blocks so a CAM layer can be picked by
name (``features.block4`` of the classifier is its last conv block).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = ["ConvBlock3d", "DefectClassifier3D", "UNet3D", "ARCHITECTURES", "build_architecture"]


class ConvBlock3d(nn.Sequential):
    """Two 3x3x3 convolutions, each followed by BatchNorm3d and its own ReLU.

    >>> ConvBlock3d(1, 8)(torch.zeros(1, 1, 8, 8, 8)).shape
    torch.Size([1, 8, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict(
            conv1=nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            bn1=nn.BatchNorm3d(out_channels),
            relu1=nn.ReLU(),
            conv2=nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False),
            bn2=nn.BatchNorm3d(out_channels),
            relu2=nn.ReLU(),
        ))


class DefectClassifier3D(nn.Module):
    """Classifies a CT patch (N, C, D, H, W) into defect classes; returns logits (N, classes).

    Conv blocks, the first ``pools`` of them followed by 2x max pooling, then global average pooling and a linear
    layer. Two poolings keep the last block (``features.block4``, the CAM layer) at 1/4 resolution: with a third,
    each of its cells would see the whole patch and Grad-CAM could no longer say where the evidence is.

    >>> net = DefectClassifier3D(num_classes=4).eval()
    >>> net(torch.zeros(2, 1, 32, 32, 32)).shape
    torch.Size([2, 4])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 4, widths: Sequence[int] = (16, 32, 48, 64),
                 pools: int = 2, dropout: float = 0.2):
        super().__init__()
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        previous = in_channels
        for index, width in enumerate(widths, start=1):
            layers[f"block{index}"] = ConvBlock3d(previous, width)
            if index <= pools:
                layers[f"pool{index}"] = nn.MaxPool3d(2)
            previous = width
        self.features = nn.Sequential(layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


class UNet3D(nn.Module):
    """A 3-D U-Net: conv blocks, 2x max pooling down, transposed convolutions up, skip connections by concatenation.

    Returns per-voxel logits (N, out_channels, D, H, W); D, H, W must be divisible by 2**(levels - 1).

    >>> net = UNet3D(out_channels=2, widths=(4, 8, 16)).eval()
    >>> net(torch.zeros(1, 1, 16, 16, 16)).shape
    torch.Size([1, 2, 16, 16, 16])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, widths: Sequence[int] = (8, 16, 32, 64)):
        super().__init__()
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        previous = in_channels
        for index, width in enumerate(widths):
            self.encoders.append(ConvBlock3d(previous, width))
            if index < len(widths) - 1:
                self.pools.append(nn.MaxPool3d(2))
            previous = width
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.ups.append(nn.ConvTranspose3d(previous, width, 2, stride=2))
            self.decoders.append(ConvBlock3d(2 * width, width))
            previous = width
        self.head = nn.Conv3d(previous, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder, pool in zip(self.encoders, self.pools):
            x = encoder(x)
            skips.append(x)
            x = pool(x)
        x = self.encoders[-1](x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "ctxai.DefectClassifier3D": DefectClassifier3D,
    "ctxai.UNet3D": UNet3D,
}
"""Architectures a model card may name for a state_dict. MONAI networks are named ``monai.networks.nets.<Name>``."""


def _monai_network(name: str) -> Callable[..., nn.Module]:
    """The network class or factory function ``monai.networks.nets.<Name>``; raises ModelError for anything else.

    A factory (``resnet18``) is accepted only when its declared return type is an ``nn.Module``: it is never called
    to find out, because a helper such as ``get_pretrained_resnet_medicalnet`` would download weights."""
    import typing

    from ..errors import ModelError

    try:
        import monai.networks.nets as monai_nets
    except ImportError as exc:
        raise ModelError(f"The model card names the MONAI network {name!r} but MONAI is not installed. "
                         "Install it with `pip install monai`.") from exc
    factory = getattr(monai_nets, name.rsplit(".", 1)[1], None)
    if isinstance(factory, type):
        returns = factory
    else:
        try:
            returns = typing.get_type_hints(factory).get("return") if callable(factory) else None
        except Exception:  # noqa: BLE001 - an annotation that does not resolve declares nothing usable
            returns = None
    if not isinstance(returns, type) or not issubclass(returns, nn.Module):
        raise ModelError(f"MONAI has no network class or network factory function {name!r}. Check the spelling in "
                         "the model card's 'architecture.name' (for example monai.networks.nets.UNet or "
                         "monai.networks.nets.resnet18).")
    return factory


def build_architecture(name: str, params: dict | None = None) -> nn.Module:
    """Instantiate an architecture named in a model card, with its keyword parameters.

    Only classes from this registry, and classes and network factory functions (``resnet18``, ...) from
    ``monai.networks.nets``, can be built: a card cannot make the loader import or call anything else, nor fetch
    pretrained weights (the card's weights file is the model).
    """
    from ..errors import ModelError

    params = dict(params or {})
    if name in ARCHITECTURES:
        factory = ARCHITECTURES[name]
    elif name.startswith("monai.networks.nets."):
        factory = _monai_network(name)
    else:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"Unknown architecture {name!r} in the model card. Use one of {known}, or a MONAI network "
                         "as monai.networks.nets.<Name>, or save the model as TorchScript.")
    if params.get("pretrained"):
        raise ModelError(f"The model card asks {name} for pretrained=true, which would download weights at load "
                         "time. Remove 'pretrained' from 'architecture.params': the card's weights file holds the "
                         "model's weights.")
    try:
        module = factory(**params)
    except TypeError as exc:
        raise ModelError(f"Cannot build {name} with the card's parameters {params}: {exc}. "
                         "Fix 'architecture.params' in the model card.") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"{name} returned a {type(module).__name__}, not a network (torch.nn.Module). Name a "
                         "network in the model card's 'architecture.name'.")
    return module
