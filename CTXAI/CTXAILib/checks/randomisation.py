"""Model-parameter randomisation (Adebayo et al. 2018): a map that survives re-initialising the network's weights
explains the architecture and the input, not what the model learned.

The network's parametrised layers are re-initialised from the top (the output end) down, cascading: first the top
third, then all of them; a profile adds two thirds and, independently, the bottom third alone. Each stage is
explained again with the same method, target region and settings, and the |map| of the trained model is
rank-correlated with the randomised one in the informative region (:func:`.base.informative_region`). The value is
the highest correlation over the cascade: a map must already change when the top layers, which hold what the model
learned about the classes, are random (guided backprop famously does not). The check fails above
:data:`THRESHOLD`; a model-independent map (the centre or target-blur controls) keeps 1.0 and fails by
construction.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch

from .base import (Check, CheckContext, CheckResult, control_maps, informative_region, map_in, rank_correlation,
                   register_check)

if TYPE_CHECKING:
    from ..engine.models import LoadedModel

__all__ = ["THRESHOLD", "RUN_STAGES", "PROFILE_STAGES", "randomised_model", "randomisation"]

THRESHOLD = 0.6
"""Highest rank correlation of |map| with a randomised model's map that still passes."""
# (name, from, to): the layers re-initialised, as fractions counted from the top (output end) of the network.
RUN_STAGES = (("top third", 0.0, 1 / 3), ("all layers", 0.0, 1.0))
PROFILE_STAGES = RUN_STAGES[:1] + (("top two thirds", 0.0, 2 / 3),) + RUN_STAGES[1:] + (
    ("bottom third alone", 2 / 3, 1.0),)


def _layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that own parameters, output end first."""
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))][::-1]


def randomised_model(model: LoadedModel, start: float = 0.0, stop: float = 1.0, seed: int = 0) -> LoadedModel:
    """A copy of ``model`` whose parametrised layers from ``start`` to ``stop`` (fractions counted from the
    output end) are re-initialised; the original is untouched.

    Layers with ``reset_parameters`` get their own initialiser (Kaiming for convolutions, identity for norms);
    others (TorchScript) get Gaussian weights with the trained tensor's standard deviation.
    """
    from ..engine.models import LoadedModel

    module = copy.deepcopy(model.module)
    layers = _layers(module)
    chosen = layers[int(math.floor(start * len(layers))):max(1, int(math.ceil(stop * len(layers))))]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for layer in chosen:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
            else:
                for parameter in layer.parameters(recurse=False):
                    parameter.normal_(0.0, float(parameter.float().std()) if parameter.numel() > 1 else 0.02)
    return LoadedModel(module, model.card, sha256=f"randomised-{start:.2f}-{stop:.2f}-of-{model.sha256}",
                       device=model.device)


def randomisation(ctx: CheckContext, stages=RUN_STAGES) -> CheckResult:
    trained = ctx.explanation
    region = informative_region(trained)
    reference = map_in(trained)[region]
    correlations = {}
    for name, start, stop in stages:
        ctx.report(f"randomisation: explaining with the {name} re-initialised")
        model = randomised_model(ctx.explainer.model, start, stop, seed=ctx.seed)
        randomised = ctx.rerun(explainer=ctx.explainer.variant(model))
        correlations[name] = round(rank_correlation(reference, randomised[region]), 4)
    value = max(correlations.values())
    # A map that does not depend on the model (the controls) is the same map after any randomisation.
    controls = {name: round(rank_correlation(m[region], m[region]), 4)
                for name, m in control_maps(trained, ctx.seed).items()}
    passed = value <= THRESHOLD
    what = (f"the map changes when the model's weights are re-initialised (rank correlation at most {value:.2f} "
            "with a random-weight model's map)" if passed else
            f"the map stays nearly the same when the model's weights are random (rank correlation {value:.2f} > "
            f"{THRESHOLD}): it shows the input and the architecture more than what the model learned")
    return CheckResult("randomisation", value, THRESHOLD, passed, what, controls,
                       {"stages": correlations, "region_voxels": int(region.sum()), "cascade": "from the top"})


register_check(Check("randomisation", "Model randomisation",
                     "highest rank correlation of |map| with the map of a model whose weights are re-initialised "
                     "(cascading from the top); must be low", randomisation, runs=len(RUN_STAGES)))
