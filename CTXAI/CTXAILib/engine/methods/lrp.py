"""Layer-wise Relevance Propagation, ours because Captum's LRP lacks Conv3d/BatchNorm3d rules and fails on skips/cat.

LRP (Bach et al. 2015, "On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
propagation", PLoS ONE 10(7): e0130140) hands the explained score back through the network, layer by layer, to the
inputs of each layer in proportion to their contributions, until it reaches the voxels. For an affine layer with
outputs ``z_k = sum_j a_j w_jk + b_k`` and output relevance ``R_k`` (notation of Montavon et al. 2019, "Layer-wise
relevance propagation: an overview", in Explainable AI, LNCS 11700, pp. 193-209):

* LRP-ε: ``R_j = sum_k a_j w_jk / (z_k + ε sign(z_k)) R_k``. The bias keeps its share ``b_k / z_k`` of ``R_k`` and ε
  damps outputs close to zero. As ε -> 0 this is gradient x input on a ReLU network.
* LRP-αβ: ``R_j = sum_k (α (a_j w_jk)+ / z_k+ - β (a_j w_jk)- / z_k-) R_k`` with β = α - 1, where ``z_k+``
  (``z_k-``) sums the positive (negative) contributions and the positive (negative) part of the bias. The sign of a
  contribution is that of activation times weight, so signed inputs (normalised CT, BatchNorm outputs) are handled:
  a negative input through a negative weight contributes positively. α = 1, β = 0 keeps only positive evidence.
* Flat: ``R_j = sum_k R_k / n_k`` over the ``n_k`` inputs connected to output ``k``: the relevance is spread evenly
  over each output's receptive field, whatever the input's values.
* Composite (the default): ε on Linear layers, α1β0 (z⁺) on convolutions and flat on the layers that read the
  input itself, as Montavon et al. 2019 and Kohlbrenner et al. 2020 ("Towards best practice in explaining neural
  network decisions with LRP", IJCNN) recommend. Pure ε (with ε -> 0) is input x gradient, and on CT input x
  gradient is mostly the grey value times a smooth gradient; z⁺ keeps the convolutions' noisy negative evidence
  from cancelling, and flat makes the map the receptive field's, not the grey value's.

The relevance is computed as "modified gradient x input": forward hooks replace the output of every rule-bearing
layer by a tensor of the same value whose backward applies the rule, one backward pass from the score gives a
gradient ``g`` at the input, and the relevance is ``input * g``. Every other operation passes its plain gradient,
which conserves relevance wherever the operation is linear or positively homogeneous: a sum ``a + b`` gives
``a * g`` and ``b * g`` (a split in proportion to the summands), concatenation, reshapes, average pooling and
interpolation are linear without bias, a max pool hands everything to its winner, and ReLU/LeakyReLU/PReLU pass
``R`` unchanged. Layers and their rules:

* Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear: the chosen rule (ε or αβ), or the composite's rule for the layer.
* BatchNorm (eval), InstanceNorm, GroupNorm, LayerNorm: their statistics are held constant, which makes each an
  element-wise affine map ``k * x + shift``. Under αβ, one that an ``nn.Sequential`` feeds straight from a
  Conv/Linear layer is merged with it (the "canonisation" of LRP practice): αβ then sees the contributions
  ``a_j w_jk k_k``, whose sign depends on the sign of ``k``, and the summed shift as bias (the composite merges
  into its convolutions likewise). Otherwise the layer takes
  the ε rule, under both rules: αβ has no meaning on one-to-one connections (with α = 2 it would double the
  relevance). Under ε, merging would only move where ε enters.
* ELU, CELU, SELU, GELU, SiLU, Mish, Tanh, Hardtanh (ReLU6), Softsign, Hardswish: relevance passes unchanged, as
  it does through ReLU (their plain gradient would not conserve it).
"""

from __future__ import annotations

import math
from functools import partial
from numbers import Real
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from ...errors import InputError, MethodError, SettingError
from .registry import MethodSpec, Setting, TileContext, register

__all__ = ["RULES", "lrp_attribute"]

RULES: tuple[str, ...] = ("composite", "epsilon", "alpha_beta")
"""The LRP rules :func:`lrp_attribute` knows."""

_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_NORMS = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_PASS_THROUGH = (nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh, nn.Softsign,
                 nn.Hardswish)
_PARAMETRIC = _AFFINE + _NORMS + (nn.PReLU,)
# Modules that compute something else in training mode; a wrapper module's own training flag does not matter.
_MODE_DEPENDENT = (_BatchNorm, _InstanceNorm, _DropoutNd, nn.RReLU)
_RULE_PARAMETERS = {"weight", "bias"}


def lrp_attribute(model: nn.Module, inputs: torch.Tensor, score_fn: Callable[[torch.Tensor], torch.Tensor], *,
                  rule: str = "composite", epsilon: float = 1e-6, alpha: float = 1.0) -> torch.Tensor:
    """Relevance of every input element for one score per sample, by LRP.

    Args:
        model: the network in eval mode, as Python modules (not TorchScript). Its parameters, buffers, hooks and
            ``requires_grad`` flags are left as they were.
        inputs: (N, C, *spatial), e.g. (N, C, D, H, W); floating point, on the model's device.
        score_fn: maps the model output to the explained scores, shape (N,): a logit, or class-1 logits summed over
            a region. It must be differentiable and linear in the output; it is part of the propagated graph.
        rule: ``"composite"`` (ε on Linear, α1β0 on convolutions, flat on the layers that read ``inputs``),
            ``"epsilon"`` (LRP-ε) or ``"alpha_beta"`` (LRP-αβ with β = α - 1).
        epsilon: the ε stabiliser, > 0. Used by the ε rule (the composite's Linear layers), and under αβ by the
            normalisation layers that are not merged into the Conv/Linear layer before them.
        alpha: α >= 1 of the αβ rule (the composite's is 1).

    Returns:
        The relevance, same shape, dtype and device as ``inputs``, detached. Per sample it sums to the score up to
        what biases, BatchNorm shifts and ε absorb (exactly, for a bias-free ReLU network as ε -> 0). Samples are
        independent: a batch gives what each sample gives alone (unless BatchNorm runs on batch statistics).

    Raises:
        SettingError: unknown rule, ε <= 0 or α < 1.
        InputError: ``inputs`` is not a finite floating-point tensor of shape (N, C, ...).
        MethodError: the model is TorchScript, is in training mode or has a parametric layer without an LRP rule,
            or ``score_fn`` does not give one differentiable score per sample.
    """
    rule, epsilon, alpha = _checked_settings(rule, epsilon, alpha)
    names = _checked_model(model)
    _check_inputs(inputs)
    propagation = _Propagation(rule, epsilon, alpha, model, names)
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module in names:
            handles.extend(propagation.attach(module))
        # The caller may be in no_grad or inference mode (the engine's other paths are); LRP needs a graph.
        with torch.inference_mode(False), torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            propagation.first_input = x
            scores = score_fn(model(x))
            _check_scores(scores, x.shape[0])
            leaves = [x] + [z for *_, z in propagation.flat]
            gradients = torch.autograd.grad(scores.sum(), leaves, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if all(gradient is None for gradient in gradients):
        raise _not_differentiable()
    with torch.inference_mode(False):
        relevance = torch.zeros_like(x) if gradients[0] is None else x * gradients[0]
        for (module, rest, kwargs, z), gradient in zip(propagation.flat, gradients[1:]):
            if gradient is not None:
                relevance = relevance + _flat_relevance(module, rest, kwargs, x, z * gradient)
    return relevance.detach()


def _checked_settings(rule: str, epsilon: float, alpha: float) -> tuple[str, float, float]:
    if rule not in RULES:
        raise SettingError(f"Unknown LRP rule {rule!r}. Use one of: {', '.join(RULES)}.")
    if not _is_real(epsilon) or not 0 < epsilon < math.inf:
        raise SettingError(f"The LRP epsilon must be a finite number > 0, got {epsilon!r}. "
                           "Use a small positive value such as 1e-6 (larger values damp weak, noisy relevance).")
    if rule == "alpha_beta" and (not _is_real(alpha) or not 1 <= alpha < math.inf):
        raise SettingError(f"The LRP alpha must be a finite number >= 1 (beta = alpha - 1 >= 0), got {alpha!r}. "
                           "Use alpha = 1 (positive evidence only) or alpha = 2 (beta = 1).")
    return rule, float(epsilon), float(alpha)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _checked_model(model: nn.Module) -> dict[nn.Module, str]:
    """Refuse models LRP cannot follow; return every module with its qualified name."""
    if not isinstance(model, nn.Module):
        raise MethodError(f"LRP needs a torch.nn.Module, got {type(model).__name__}. "
                          "Load the model with the engine's model loader.")
    names = {module: name for name, module in model.named_modules()}
    for module, name in names.items():
        where = f"'{name}'" if name else "the model"
        if isinstance(module, torch.jit.ScriptModule):
            raise MethodError(
                f"LRP cannot run on {where}: it is TorchScript ({type(module).__name__}), whose layers cannot be "
                "hooked. LRP needs the Python modules: save the weights as a state_dict and name its architecture "
                "in the model card (e.g. ctxai.UNet3D or monai.networks.nets.UNet), or use a gradient method "
                "(Integrated Gradients, Gradient x Input) on the TorchScript model.")
    for module, name in names.items():
        where = f"'{name}'" if name else "the model"
        if module.training and isinstance(module, _MODE_DEPENDENT):
            raise MethodError(
                f"LRP explains a model in evaluation mode, but {where} ({type(module).__name__}) is in training "
                "mode, where BatchNorm uses batch statistics and updates its running averages and Dropout drops "
                "at random. Call model.eval() before explaining.")
        own = {parameter for parameter, _ in module.named_parameters(recurse=False)}
        if own and not (isinstance(module, _PARAMETRIC) and own <= _RULE_PARAMETERS):
            raise MethodError(
                f"LRP has no rule for {where} ({type(module).__name__}, parameters: {', '.join(sorted(own))}): "
                "only convolutions, transposed convolutions, Linear, BatchNorm/InstanceNorm/GroupNorm/LayerNorm and "
                "PReLU carry parameters it can propagate through. Use a gradient method (Integrated Gradients, "
                "Gradient x Input, SmoothGrad) or occlusion for this model.")
    return names


def _check_inputs(inputs: torch.Tensor) -> None:
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
        described = (f"{inputs.dtype} tensor of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor)
                     else type(inputs).__name__)
        raise InputError(f"LRP needs a floating-point tensor of shape (N, C, ...) such as (N, C, D, H, W), got a "
                         f"{described}. Convert the volume with .float() and add batch and channel axes.")
    if not torch.isfinite(inputs).all():
        raise InputError("The input of LRP contains NaN or infinite voxels. Replace them (e.g. with the background "
                         "value) before explaining.")


def _check_scores(scores: torch.Tensor, batch: int) -> None:
    if not isinstance(scores, torch.Tensor) or scores.shape != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise MethodError(f"The LRP score function must return one score per sample, shape ({batch},), got "
                          f"{shape}. Select one logit per sample or sum the region, e.g. output[:, c] or "
                          "output[:, c, box].sum(dim=(1, 2, 3)).")
    if not scores.requires_grad:
        raise _not_differentiable()


def _not_differentiable() -> MethodError:
    return MethodError("The LRP score does not depend differentiably on the input: the model or the score function "
                       "detaches it (torch.no_grad, .detach(), .item(), numpy). LRP needs a differentiable score; "
                       "compute it from the model output with torch operations.")


class _Propagation:
    """The forward hooks of one LRP run, which put each layer's rule into the backward pass."""

    def __init__(self, rule: str, epsilon: float, alpha: float, model: nn.Module, names: dict[nn.Module, str]):
        self.rule = rule
        self.epsilon = epsilon
        self.alpha = 1.0 if rule == "composite" else alpha
        self.beta = self.alpha - 1.0
        self.names = names
        self.norm_after = _norms_after_layers(model) if rule != "epsilon" else {}
        # The composite's flat rule: the model input, and per call of a layer reading it (layer, other arguments,
        # keyword arguments, the output as a leaf where the backward stops).
        self.first_input: torch.Tensor | None = None
        self.flat: list[tuple[nn.Module, tuple, dict, torch.Tensor]] = []
        # Set while αβ re-runs a layer in backward, so that the layer's own hook stays out of the re-run.
        self.recomputing = False
        self.activation_inputs: dict[nn.Module, list[torch.Tensor]] = {}
        self.merge_candidates: dict[nn.Module, tuple] = {}

    def attach(self, module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Hook ``module`` if it has a rule; return the handles that remove the hooks."""
        if isinstance(module, _AFFINE):
            if self.rule == "composite":
                return [module.register_forward_hook(self._composite, with_kwargs=True)]
            if self.rule == "alpha_beta":
                return [module.register_forward_hook(self._alpha_beta, with_kwargs=True)]
            return [module.register_forward_hook(self._epsilon)]
        if isinstance(module, _NORMS):
            return [module.register_forward_hook(self._norm)]
        if isinstance(module, _PASS_THROUGH):
            return [module.register_forward_pre_hook(self._keep_activation_input),
                    module.register_forward_hook(self._pass_through)]
        return []

    def _input(self, module: nn.Module, args: tuple) -> torch.Tensor:
        if not args or not isinstance(args[0], torch.Tensor):
            raise MethodError(
                f"LRP cannot follow the layer '{self.names[module]}' ({type(module).__name__}): it was called without "
                "its input tensor as first positional argument. Call it as layer(x) in forward(), or use a gradient "
                "method.")
        return args[0]

    def _composite(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if self.recomputing:
            return None
        if self._input(module, args) is self.first_input:
            # Flat, computed once the backward has reached this output (lrp_attribute): stop the backward here.
            leaf = output.detach().requires_grad_(True)
            self.flat.append((module, args[1:], kwargs, leaf))
            return leaf
        if isinstance(module, nn.Linear):
            return self._epsilon(module, args, output)
        return self._alpha_beta(module, args, kwargs, output)

    def _epsilon(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self._input(module, args).requires_grad:
            return None
        # The layer's own backward then multiplies by W^T: R_j = a_j sum_k w_jk (R_k / (z_k + ε sign z_k)).
        return _same_value(output, output * _epsilon_scale(output, self.epsilon).to(output.dtype))

    def _norm(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = self._input(module, args)
        if not x.requires_grad:
            return None
        # Autograd would also differentiate the statistics; LRP treats them as constants of an affine map.
        slope, shift = _norm_affine(module, x)
        candidate = self.merge_candidates.pop(module, None)
        if candidate is not None and candidate[-1] is x:
            # Fed by the αβ layer just before it and by nothing else: αβ on the merged affine map.
            layer, a, rest, kwargs, _ = candidate
            bias = layer.bias
            merged_bias = shift if bias is None else shift + slope * _output_layout(layer, bias.detach())
            return _Relay.apply(a, output.detach(), partial(self._alpha_beta_gradient, layer, rest, kwargs, slope,
                                                            merged_bias))
        slope = slope * _epsilon_scale(output, self.epsilon)
        return _same_value(output, x * slope.to(x.dtype))

    def _keep_activation_input(self, module: nn.Module, args: tuple) -> tuple | None:
        x = self._input(module, args)
        self.activation_inputs.setdefault(module, []).append(x)
        if getattr(module, "inplace", False) and x.requires_grad:
            # An in-place activation would overwrite the pre-activation that the rule needs: run it on a copy.
            return (x.clone(), *args[1:])
        return None

    def _pass_through(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = self.activation_inputs[module].pop()
        if not x.requires_grad:
            return None
        x_value = x.detach()
        # Gradient y/x at the input makes x * gradient = y * (gradient at y): the relevance passes unchanged.
        ratio = torch.where(x_value != 0, output.detach() / x_value, 0.0)
        return _same_value(output, x * ratio)

    def _alpha_beta(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if self.recomputing:
            return None
        x = self._input(module, args)
        if not x.requires_grad:
            return None
        rest = args[1:]
        bias = None if module.bias is None else _output_layout(module, module.bias.detach())
        relayed = _Relay.apply(x, output.detach(), partial(self._alpha_beta_gradient, module, rest, kwargs, None,
                                                           bias))
        if module in self.norm_after:
            self.merge_candidates[self.norm_after[module]] = (module, x, rest, kwargs, relayed)
        return relayed

    def _alpha_beta_gradient(self, module: nn.Module, rest: tuple, kwargs: dict, gain: torch.Tensor | None,
                             bias: torch.Tensor | None, a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Gradient at the layer input ``a`` whose product with ``a`` is the αβ relevance of the inputs.

        The layer is ``gain * (W a) + bias`` (``gain`` is a merged normalisation's slope, None for 1), with ``bias``
        and ``gain`` broadcasting to the output. Splitting ``a = a+ + a-`` and ``W = W+ + W-``, the positive
        contributions to ``W a`` are ``W+ a+`` and ``W- a-``, the negative ones ``W- a+`` and ``W+ a-``; re-running
        the layer on those pairs gives them, the gain and bias give ``z+`` and ``z-``, and the gradients of ``z+`` and
        ``z-`` (weighted by α R / z+ and -β R / z-) with respect to ``a+`` and ``a-`` are the gradient where ``a`` is
        positive and where it is negative.
        """
        dtype = _compute_dtype(a.dtype, module.weight.dtype)
        weight = module.weight.detach().to(dtype)
        # The bias comes in below, in the output's layout; the re-runs have none.
        no_bias = {} if module.bias is None else {"bias": torch.zeros_like(module.bias, dtype=dtype)}

        def layer(inputs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return functional_call(module, {**no_bias, "weight": w}, (inputs, *rest), kwargs)

        self.recomputing = True
        try:
            # Full precision, whatever autocast the forward ran under: z+ and z- can cancel.
            with torch.enable_grad(), torch.autocast(a.device.type, enabled=False):
                a_pos = a.detach().to(dtype).clamp(min=0).requires_grad_(True)
                a_neg = a.detach().to(dtype).clamp(max=0).requires_grad_(True)
                positive = layer(a_pos, weight.clamp(min=0)) + layer(a_neg, weight.clamp(max=0))
                negative = layer(a_pos, weight.clamp(max=0)) + layer(a_neg, weight.clamp(min=0))
                if gain is None:
                    z_pos, z_neg = positive, negative
                else:
                    # A negative gain (a normalisation with a negative scale) turns contributions of one sign into
                    # the other.
                    up, down = gain.to(dtype).clamp(min=0), gain.to(dtype).clamp(max=0)
                    z_pos, z_neg = up * positive + down * negative, up * negative + down * positive
                if bias is not None:
                    z_pos = z_pos + bias.to(dtype).clamp(min=0)
                    z_neg = z_neg + bias.to(dtype).clamp(max=0)
                relevance = (z_pos + z_neg).detach() * grad.to(dtype)
                weights = (self.alpha * _divide(relevance, z_pos.detach()),
                           -self.beta * _divide(relevance, z_neg.detach()))
                g_pos, g_neg = torch.autograd.grad((z_pos, z_neg), (a_pos, a_neg), weights)
        finally:
            self.recomputing = False
        return torch.where(a > 0, g_pos, g_neg).to(a.dtype)


def _flat_relevance(module: nn.Module, rest: tuple, kwargs: dict, a: torch.Tensor,
                    relevance: torch.Tensor) -> torch.Tensor:
    """The flat rule: ``R_j = sum_k R_k / n_k`` for the input ``a`` of ``module``, its output relevance given.

    Re-running the layer with unit weights, no bias, on a tensor of ones counts each output's connections ``n_k``
    (zero padding counts none), and the gradient of that run weighted by ``R_k / n_k`` is the sum over ``k``.
    """
    dtype = _compute_dtype(a.dtype, module.weight.dtype)
    parameters = {"weight": torch.ones_like(module.weight, dtype=dtype)}
    if module.bias is not None:
        parameters["bias"] = torch.zeros_like(module.bias, dtype=dtype)
    with torch.enable_grad(), torch.autocast(a.device.type, enabled=False):
        ones = torch.ones_like(a, dtype=dtype).requires_grad_(True)
        counts = functional_call(module, parameters, (ones, *rest), kwargs)
        (spread,) = torch.autograd.grad(counts, ones, _divide(relevance.to(dtype), counts.detach()))
    return spread.to(a.dtype)


def _norms_after_layers(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Conv/Linear layers whose output an ``nn.Sequential`` hands to a normalisation layer and to nothing else, each
    mapped to that normalisation layer (the first module of a nested Sequential counts as next)."""
    following: dict[nn.Module, nn.Module] = {}
    for container in model.modules():
        if not _runs_in_order(container):
            continue
        # Iterate the Sequential itself, not children(): a module listed twice runs twice.
        modules = list(container)
        for layer, after in zip(modules, modules[1:]):
            while _runs_in_order(after) and len(after) > 0:
                after = after[0]
            if isinstance(layer, _AFFINE) and isinstance(after, _NORMS):
                following[layer] = after
    return following


def _runs_in_order(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _output_layout(module: nn.Module, per_channel: torch.Tensor) -> torch.Tensor:
    """A per-output-channel tensor of a Conv/Linear layer shaped to broadcast against the layer's output."""
    if isinstance(module, nn.Linear):
        return per_channel
    return per_channel.reshape(-1, *(1,) * (module.weight.dim() - 2))


class _Relay(torch.autograd.Function):
    """Passes a layer's output value on, with a backward given as a function of the layer input and the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: torch.Tensor,
                input_gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.input_gradient = input_gradient
        # A fresh tensor, not the input as is: later layers may modify it in place (ReLU(inplace=True)).
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return ctx.input_gradient(x, grad), None, None


def _same_value(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``surrogate``: a rule's backward without touching the forward."""
    return value.detach() + (surrogate - surrogate.detach()).to(value.dtype)


def _epsilon_scale(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z / (z + ε sign(z))`` with sign(0) = +1, detached: what LRP-ε multiplies the gradient at ``z`` by."""
    z = z.detach().to(_compute_dtype(z.dtype))
    return z / (z + torch.where(z >= 0, epsilon, -epsilon))


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The widest of ``dtypes`` and float32: half-precision sums and ratios would lose the small contributions."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, 0 where the denominator is 0 (no contribution of that sign: nothing to share)."""
    return torch.where(denominator != 0, numerator / denominator, 0.0)


def _norm_affine(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slope ``k`` and shift ``s`` of a normalisation layer, output ``k * x + s``, with its statistics held constant.

    Both are detached and broadcast to ``x``, which is (N, C, ...) for BatchNorm, InstanceNorm and GroupNorm and
    (..., *normalized_shape) for LayerNorm.
    """
    x = x.detach().to(_compute_dtype(x.dtype))
    per_channel = (1, -1) + (1,) * (x.dim() - 2)
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        mean, variance = x.mean(dim=dims, keepdim=True), x.var(dim=dims, correction=0, keepdim=True)
    elif isinstance(module, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        channels_per_group = x.shape[1] // module.num_groups
        mean, variance = (statistic.repeat_interleave(channels_per_group, dim=1).reshape(x.shape[0], *per_channel[1:])
                          for statistic in (grouped.mean(dim=-1), grouped.var(dim=-1, correction=0)))
    elif module.running_var is not None:
        # Eval mode (checked before): BatchNorm, and InstanceNorm with track_running_stats, use running statistics.
        mean = module.running_mean.detach().to(x.dtype).reshape(per_channel)
        variance = module.running_var.detach().to(x.dtype).reshape(per_channel)
    else:
        dims = (0, *range(2, x.dim())) if isinstance(module, _BatchNorm) else tuple(range(2, x.dim()))
        mean, variance = x.mean(dim=dims, keepdim=True), x.var(dim=dims, correction=0, keepdim=True)
    slope = torch.rsqrt(variance + module.eps)
    shift = -mean * slope

    def layout(parameter: torch.Tensor) -> torch.Tensor:
        parameter = parameter.detach().to(x.dtype)
        return parameter if isinstance(module, nn.LayerNorm) else parameter.reshape(per_channel)

    if module.weight is not None:
        slope, shift = slope * layout(module.weight), shift * layout(module.weight)
    if module.bias is not None:
        shift = shift + layout(module.bias)
    return slope, shift


def lrp(ctx: TileContext, settings: dict) -> torch.Tensor:
    # The score module is the network plus the target, so LRP starts from exactly the explained score.
    return lrp_attribute(ctx.score, ctx.x, lambda scores: scores, rule=settings["rule"],
                         epsilon=settings["epsilon"], alpha=settings["alpha"])[0]


register(MethodSpec(
    "lrp", "LRP", "relevance",
    "The target's logit redistributed layer by layer onto the voxels (Bach et al. 2015), with a composite of "
    "the epsilon, alpha-beta and flat rules (or one of the first two) on 3-D convolutions, norms and pooling.",
    sign="attribution", aggregation="sum", kernel=lrp, samples=lambda s, shape: 1.0, needs_hooks=True,
    settings=(Setting("rule", "choice", "composite", "composite: epsilon on dense layers, alpha1-beta0 on "
                      "convolutions, flat on the first layer (LRP best practice); epsilon: conservative, equal to "
                      "gradient x input as epsilon -> 0; alpha_beta: positive and negative evidence weighted "
                      "separately.", choices=RULES),
              Setting("epsilon", "float", 1e-6, "Stabiliser of the epsilon rule (larger: sparser, less noisy).",
                      minimum=1e-12, maximum=10.0),
              Setting("alpha", "float", 1.0, "alpha of the alpha-beta rule (beta = alpha - 1).", minimum=1.0,
                      maximum=10.0))))
