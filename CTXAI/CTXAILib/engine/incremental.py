"""Exact incremental occlusion: each occluded forward pass computed only where the occluding window reaches.

Filling one small window of the input changes, in the next convolution, only the outputs whose receptive field
touches it, and so on layer by layer: the change spreads as a box that grows by the kernel's reach and shrinks with
each stride. Outside that box every activation equals the clean one. So an occluded pass needs, per layer, only the
affected sub-box, computed from the clean activations around it (the convolution's input crop is the clean map
with the changed box pasted in). That is exact, not an approximation: every value is what the full pass computes,
up to float rounding. Captum's ``Occlusion`` and MONAI's ``OcclusionSensitivity`` recompute the whole patch for every
window instead.

The network is traced with ``torch.fx``. Followed locally: Conv3d and ConvTranspose3d (zero padding), MaxPool3d,
AvgPool3d, BatchNorm3d in eval mode, element-wise activations and dropout, and skip connections by addition or
concatenation over channels. A global average pool turns the changed box into a per-window vector and everything
after it (flatten, linear) runs on the batch of windows as usual. An operation that mixes the whole feature map
(instance or group normalisation, attention, reshapes of a spatial map) is run in full on each window's map, which
stays exact but saves nothing from there on; a network fx cannot trace (TorchScript, data-dependent control flow)
raises :class:`Unsupported` and the caller falls back to full passes. Each tile checks one window against a full
pass before trusting the rest.
"""

from __future__ import annotations

import functools
import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .runtime import autocast
from .sliding import crop_padded

__all__ = ["IncrementalOcclusion", "Unsupported", "window_boxes"]

_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                      nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
                      nn.Dropout, nn.Dropout3d, nn.AlphaDropout)
_POINTWISE_FUNCTIONS = {F.relu, torch.relu, torch.sigmoid, torch.tanh, F.leaky_relu, F.gelu, F.silu, F.elu,
                        F.dropout, torch.exp, torch.abs, torch.neg}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "exp", "abs", "neg", "contiguous", "float"}
_MERGE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_MERGE_METHODS = {"add", "sub", "mul", "div"}
_CHECK_TOLERANCE = 1e-3  # relative to the score's magnitude: float rounding is ~1e-6, a wrong path is far larger


class Unsupported(Exception):
    """The incremental path cannot follow this network; the message says why (the caller runs full passes)."""


def window_boxes(shape: tuple[int, ...], window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Occlusion windows over a spatial ``shape`` (tensor order), as Captum places them: starts at multiples of
    ``stride`` until the window reaches the far edge (the last one clipped there). Returns ``lo, hi`` of shape
    (windows, 3)."""
    per_axis = []
    for n in shape:
        w = min(window, n)
        count = -(-(n - w) // stride) + 1
        per_axis.append([(p * stride, min(p * stride + w, n)) for p in range(count)])
    boxes = np.array([[a for a, _ in combo] + [b for _, b in combo] for combo in itertools.product(*per_axis)])
    return boxes[:, :3], boxes[:, 3:]


@dataclass
class _Reach:
    """How a windowed operation maps boxes: kernel, stride, padding and dilation per spatial axis."""

    kernel: np.ndarray
    stride: np.ndarray
    padding: np.ndarray
    dilation: np.ndarray

    @classmethod
    def of(cls, kernel: Any, stride: Any, padding: Any, dilation: Any = 1) -> _Reach:
        def triple(v: Any) -> np.ndarray:
            return np.array(v if isinstance(v, (tuple, list)) else (v,) * 3, dtype=np.int64)
        return cls(triple(kernel), triple(stride if stride is not None else kernel), triple(padding),
                   triple(dilation))

    @property
    def span(self) -> np.ndarray:
        return self.dilation * (self.kernel - 1) + 1


@dataclass
class _Op:
    node: fx.Node
    kind: str                 # input, conv, convT, pool, pointwise, merge, mean, dense, output
    reach: _Reach | None = None
    pad_value: float = 0.0
    module: nn.Module | None = None


@dataclass
class _Local:
    """A node's value on a batch of windows: the clean map except inside per-window boxes ``lo:hi``; the new
    values come in groups of windows whose boxes have one size: (window positions, (G, C, *size))."""

    lo: np.ndarray
    hi: np.ndarray
    groups: list[tuple[np.ndarray, torch.Tensor]]

    @functools.cached_property
    def pieces(self) -> dict[int, torch.Tensor]:
        """Each window's changed values, by window position."""
        return {int(p): values[g] for positions, values in self.groups for g, p in enumerate(positions)}


def _by_size(lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    sizes = hi - lo
    unique, inverse = np.unique(sizes, axis=0, return_inverse=True)
    return [(np.flatnonzero(inverse.ravel() == g), tuple(int(v) for v in size)) for g, size in enumerate(unique)]


def _window(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


class IncrementalOcclusion:
    """Traces ``network`` once; :meth:`scores` then evaluates occluded copies of a tile window by window.

    ``network`` must be in eval mode (dropout and batch norm fixed), as it is for every explanation.
    """

    def __init__(self, network: nn.Module):
        if isinstance(network, torch.jit.ScriptModule):
            raise Unsupported("the model is TorchScript, whose layers torch.fx cannot follow")
        if network.training:
            raise Unsupported("the network is in training mode")
        try:
            self.traced = fx.symbolic_trace(network)
        except Exception as exc:  # noqa: BLE001 - fx raises many kinds for untraceable Python
            raise Unsupported(f"torch.fx cannot trace its forward ({type(exc).__name__}: {exc})") from exc
        self.modules = dict(self.traced.named_modules())
        inputs = [n for n in self.traced.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise Unsupported(f"its forward takes {len(inputs)} inputs, not one volume")
        self.ops: list[_Op] = []
        dependent: set[fx.Node] = set()
        self.whole_map_layers: set[str] = set()  # spatial maps run in full for every window
        for node in self.traced.graph.nodes:
            if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
                dependent.add(node)
                self.ops.append(self._classify(node, dependent))
        self.dependent = dependent

    # ------------------------------------------------------------------------------------------ the graph
    def _classify(self, node: fx.Node, dependent: set[fx.Node]) -> _Op:
        if node.op == "placeholder":
            return _Op(node, "input")
        if node.op == "output":
            return _Op(node, "output")
        tensors = [a for a in node.all_input_nodes if a in dependent]
        if node.op == "call_module":
            module = self.modules[node.target]
            if isinstance(module, nn.Conv3d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
                return _Op(node, "conv", _Reach.of(module.kernel_size, module.stride, module.padding, module.dilation),
                           module=module)
            if isinstance(module, nn.ConvTranspose3d) and module.padding_mode == "zeros":
                reach = _Reach.of(module.kernel_size, module.stride, module.padding, module.dilation)
                if np.all(reach.span >= reach.stride):  # otherwise some outputs see no input at all
                    return _Op(node, "convT", reach, module=module)
            if isinstance(module, nn.MaxPool3d) and not module.ceil_mode and not module.return_indices:
                return _Op(node, "pool", _Reach.of(module.kernel_size, module.stride, module.padding,
                                                   module.dilation), pad_value=float("-inf"), module=module)
            if (isinstance(module, nn.AvgPool3d) and not module.ceil_mode and module.divisor_override is None
                    and not np.any(_Reach.of(1, 1, module.padding).padding)):
                return _Op(node, "pool", _Reach.of(module.kernel_size, module.stride, 0), module=module)
            if isinstance(module, nn.BatchNorm3d) and module.running_mean is not None:
                return _Op(node, "pointwise")  # eval mode: a fixed affine map per channel
            if isinstance(module, _POINTWISE_MODULES) or (isinstance(module, (nn.Softmax, nn.LogSoftmax))
                                                           and module.dim == 1):
                return _Op(node, "pointwise")
            if isinstance(module, nn.AdaptiveAvgPool3d) and np.all(_Reach.of(module.output_size, 1, 0).kernel == 1):
                return _Op(node, "mean")
            return _Op(node, "dense")
        if node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim == 1:
                return _Op(node, "merge")
        elif node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS and len(tensors) == 1:
            return _Op(node, "pointwise")
        elif node.op == "call_function" and node.target in _MERGE_FUNCTIONS:
            return _Op(node, "merge")
        elif node.op == "call_method" and node.target in _POINTWISE_METHODS and len(tensors) == 1:
            return _Op(node, "pointwise")
        elif node.op == "call_method" and node.target in _MERGE_METHODS:
            return _Op(node, "merge")
        return _Op(node, "dense")

    def _clean(self, x: torch.Tensor) -> dict[fx.Node, Any]:
        values: dict[fx.Node, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                values[n] = super().run_node(n)
                return values[n]

        with torch.no_grad():
            Recorder(self.traced).run(x)
        return values

    # ------------------------------------------------------------------------------------------ the boxes
    def _boxes(self, clean: dict[fx.Node, Any], lo: np.ndarray, hi: np.ndarray) -> dict[fx.Node, tuple]:
        """Per local node: (lo, hi) of its changed box for every window, and for windowed ops the input region
        ``need`` their box reads. Nodes that became whole-batch values carry None."""
        boxes: dict[fx.Node, tuple | None] = {}
        for op in self.ops:
            node = op.node
            if op.kind == "input":
                boxes[node] = (lo, hi)
                continue
            if op.kind == "output":
                continue
            sources = [a for a in node.all_input_nodes if a in self.dependent]
            if op.kind in ("mean", "dense") or any(boxes[a] is None for a in sources) \
                    or not all(self._spatial(clean[a]) for a in sources):
                if op.kind != "mean" and any(boxes[a] is not None for a in sources):
                    self.whole_map_layers.add(node.name)
                boxes[node] = None
                continue
            size = np.array(clean[node].shape[2:])
            if op.kind in ("conv", "pool"):
                a_lo, a_hi = boxes[sources[0]][:2]
                r = op.reach
                o_lo = np.maximum(-((-(a_lo + r.padding - r.span + 1)) // r.stride), 0)
                o_hi = np.minimum((a_hi - 1 + r.padding) // r.stride + 1, size)
                need = (o_lo * r.stride - r.padding, (o_hi - 1) * r.stride - r.padding + r.span)
                boxes[node] = (o_lo, o_hi, need)
            elif op.kind == "convT":
                a_lo, a_hi = boxes[sources[0]][:2]
                r = op.reach
                n_in = np.array(clean[sources[0]].shape[2:])
                o_lo = np.maximum(a_lo * r.stride - r.padding, 0)
                o_hi = np.minimum((a_hi - 1) * r.stride - r.padding + r.span,
                                  np.minimum(size, (n_in - 1) * r.stride - r.padding + r.span))
                i_lo = np.maximum((o_lo + r.padding - r.span + 1) // r.stride, 0)
                i_hi = np.minimum((o_hi - 1 + r.padding) // r.stride + 1, n_in)
                boxes[node] = (o_lo, o_hi, (i_lo, i_hi))
            else:  # pointwise, merge: the union of the changed inputs' boxes
                if any(tuple(clean[a].shape[2:]) != tuple(size) for a in sources):
                    self.whole_map_layers.add(node.name)
                    boxes[node] = None
                    continue
                boxes[node] = (np.min([boxes[a][0] for a in sources], axis=0),
                               np.max([boxes[a][1] for a in sources], axis=0))
            if np.any(boxes[node][1] <= boxes[node][0]):
                raise Unsupported(f"layer {node.name} skips input positions (stride larger than its kernel)")
        return boxes

    @staticmethod
    def _spatial(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim == 5

    # ------------------------------------------------------------------------------------------ evaluation
    def scores(self, x: torch.Tensor, fill: torch.Tensor, lo: np.ndarray, hi: np.ndarray, score: nn.Module,
               batch_size: int, tick: Callable[[int], None]) -> torch.Tensor:
        """Target scores (windows,) of ``x`` (1, C, *tile) with ``fill`` pasted into each box ``lo:hi``.

        ``score`` is the run's ScoreModel (its ``reduce`` and ``activated`` turn model outputs into the target);
        ``batch_size`` full passes fit the memory budget, and as many windows as take that memory in changed boxes
        are evaluated together; ``tick(n)`` counts them (and raises when the run is cancelled).
        """
        with torch.no_grad(), autocast(x.device, score.precision):
            clean = self._clean(x)
            boxes = self._boxes(clean, lo, hi)
            chunk = self._chunk(clean, boxes, batch_size)
            padded: dict[tuple[fx.Node, float], tuple[torch.Tensor, np.ndarray]] = {}
            out = []
            for start in range(0, len(lo), max(1, chunk)):
                part = slice(start, start + max(1, chunk))
                out.append(self._evaluate(clean, boxes, part, fill, score, padded))
                tick(len(out[-1]))
                if start == 0:
                    self._check(x, fill, lo[0], hi[0], score, float(out[0][0]))
            return torch.cat(out)

    def _chunk(self, clean: dict, boxes: dict, batch_size: int, limit: int = 256) -> int:
        full = local = 0
        for node, box in boxes.items():
            if node in clean and self._spatial(clean[node]):
                channels, voxels = clean[node].shape[1], clean[node][0, 0].numel()
                full += channels * voxels
                # Changed values plus the crop they are computed from: about twice the box.
                local += channels * (2 * float(np.prod(box[1] - box[0], axis=1).mean()) if box is not None else voxels)
        return int(max(batch_size, min(limit, batch_size * full / max(local, 1.0))))

    def _check(self, x: torch.Tensor, fill: torch.Tensor, lo: np.ndarray, hi: np.ndarray, score: nn.Module,
               incremental: float) -> None:
        occluded = x.clone()
        region = (slice(None), slice(None)) + _window(lo, hi)
        occluded[region] = fill[region]
        full = float(score.reduce(self.traced(occluded))[0])
        if abs(full - incremental) > _CHECK_TOLERANCE * max(1.0, abs(full)):
            raise Unsupported(f"its incremental score {incremental:.6g} differed from a full pass ({full:.6g}) "
                              "on the first window")

    def _evaluate(self, clean: dict, boxes: dict, part: slice, fill: torch.Tensor, score: nn.Module,
                  padded: dict) -> torch.Tensor:
        values: dict[fx.Node, Any] = {}
        for op in self.ops:
            node = op.node
            if op.kind == "output":
                return self._score(clean, values, boxes, node.args[0], part, score)
            if op.kind == "input":
                lo, hi = (b[part] for b in boxes[node])
                groups = [(positions, self._gather(fill, np.zeros(3, np.int64), lo[positions], size))
                          for positions, size in _by_size(lo, hi)]
                values[node] = _Local(lo, hi, groups)
            elif boxes.get(node) is None:
                values[node] = self._whole(op, clean, values, boxes, part)
            elif op.kind in ("conv", "pool", "convT"):
                values[node] = self._windowed(op, clean, values, boxes, part, padded)
            else:
                values[node] = self._elementwise(op, clean, values, boxes, part)
        raise Unsupported("the traced graph has no output")

    def _gather(self, source: torch.Tensor, margin: np.ndarray, lo: np.ndarray, size: tuple[int, ...]) -> torch.Tensor:
        """Crops ``source[0, :, lo + margin : lo + margin + size]`` for each row of ``lo``, stacked: (G, C, *size)."""
        return torch.stack([source[(0, slice(None)) + _window(start + margin, start + margin + np.array(size))]
                            for start in lo])

    def _paste(self, crops: torch.Tensor, crop_lo: np.ndarray, positions: np.ndarray, local: _Local) -> None:
        """Write each window's changed values into its crop (the part of its box the crop covers)."""
        pieces = local.pieces
        for g, position in enumerate(positions):
            a = np.maximum(local.lo[position], crop_lo[g])
            b = np.minimum(local.hi[position], crop_lo[g] + np.array(crops.shape[2:]))
            if np.any(b <= a):
                continue
            crops[(g, slice(None)) + _window(a - crop_lo[g], b - crop_lo[g])] = \
                pieces[int(position)][(slice(None),) + _window(a - local.lo[position], b - local.lo[position])]

    def _patched(self, source: fx.Node, clean: dict, values: dict, lo: np.ndarray, hi: np.ndarray,
                 positions: np.ndarray, size: tuple[int, ...], padded: dict | None = None,
                 pad_value: float = 0.0) -> torch.Tensor:
        """The input region ``lo:hi`` of ``source`` for windows ``positions``: clean values (padded beyond the
        map with ``pad_value``), the window's changed box pasted in."""
        local = values[source]
        if padded is None and np.array_equal(local.lo[positions], lo[positions]) \
                and np.array_equal(local.hi[positions], hi[positions]):
            for group_positions, group_values in local.groups:  # same boxes: the values as they are
                if np.array_equal(group_positions, positions):
                    return group_values
        margin = np.zeros(3, np.int64)
        base = clean[source]
        if padded is not None:
            key = (source, pad_value)
            need = np.max(np.concatenate([-lo, hi - np.array(base.shape[2:]), np.zeros((1, 3), np.int64)]), axis=0)
            if key not in padded or np.any(padded[key][1] < need):
                pads = [int(v) for m in reversed(need) for v in (m, m)]
                padded[key] = (F.pad(base, pads, value=pad_value) if any(pads) else base, need)
            base, margin = padded[key]
        crops = self._gather(base, margin, lo[positions], size)
        self._paste(crops, lo[positions], positions, values[source])
        return crops

    def _windowed(self, op: _Op, clean: dict, values: dict, boxes: dict, part: slice, padded: dict) -> _Local:
        node, module = op.node, op.module
        source = next(a for a in node.all_input_nodes if a in self.dependent)
        o_lo, o_hi, (n_lo, n_hi) = (b[part] if isinstance(b, np.ndarray) else tuple(v[part] for v in b)
                                    for b in boxes[node])
        groups = []
        for positions, need in _by_size(n_lo, n_hi):
            if op.kind == "convT":
                crops = self._patched(source, clean, values, n_lo, n_hi, positions, need)
                full = F.conv_transpose3d(crops, module.weight, module.bias, module.stride, 0, 0, module.groups,
                                          module.dilation)
                # The crop's first output sits at n_lo * stride - padding; keep the window's box of it.
                offset = o_lo[positions] - (n_lo[positions] * op.reach.stride - op.reach.padding)
                out_size = o_hi[positions] - o_lo[positions]
                for sub, size in _by_size(offset, offset + out_size):
                    picked = full[sub]
                    groups.append((positions[sub], torch.stack([
                        piece[(slice(None),) + _window(off, off + np.array(size))]
                        for piece, off in zip(picked, offset[sub])])))
                continue
            crops = self._patched(source, clean, values, n_lo, n_hi, positions, need, padded, op.pad_value)
            if op.kind == "conv":
                result = F.conv3d(crops, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
            elif isinstance(module, nn.MaxPool3d):
                result = F.max_pool3d(crops, module.kernel_size, module.stride, 0, module.dilation)
            else:
                result = F.avg_pool3d(crops, module.kernel_size, module.stride, 0)
            groups.append((positions, result))
        return _Local(o_lo, o_hi, groups)

    def _elementwise(self, op: _Op, clean: dict, values: dict, boxes: dict, part: slice) -> _Local:
        node = op.node
        lo, hi = (b[part] for b in boxes[node])
        groups = []
        for positions, size in _by_size(lo, hi):
            env = {}
            for a in node.all_input_nodes:
                if a in self.dependent:
                    env[a] = self._patched(a, clean, values, lo, hi, positions, size)
                elif self._spatial(clean[a]) and clean[a].shape[2:] == clean[node].shape[2:]:
                    env[a] = self._gather(clean[a], np.zeros(3, np.int64), lo[positions], size)  # a constant map
                else:
                    env[a] = clean[a]
            groups.append((positions, self._call(node, env)))
        return _Local(lo, hi, groups)

    def _dense(self, node: fx.Node, clean: dict, values: dict, count: int) -> Any:
        value = values[node]
        if not isinstance(value, _Local):
            return value
        full = clean[node].expand((count,) + tuple(clean[node].shape[1:])).clone()
        pieces = value.pieces
        for position in range(count):
            full[(position, slice(None)) + _window(value.lo[position], value.hi[position])] = pieces[position]
        return full

    def _whole(self, op: _Op, clean: dict, values: dict, boxes: dict, part: slice) -> torch.Tensor:
        node = op.node
        count = len(next(iter(values.values())).lo)
        if op.kind == "mean" and isinstance(values[node.all_input_nodes[0]], _Local):
            # The mean changes by the changed box's sum of differences over the map's voxel count.
            source = node.all_input_nodes[0]
            local = values[source]
            voxels = float(np.prod(clean[source].shape[2:]))
            result = clean[node].expand((count,) + tuple(clean[node].shape[1:])).clone()
            for positions, new in local.groups:
                old = self._gather(clean[source], np.zeros(3, np.int64), local.lo[positions], tuple(new.shape[2:]))
                delta = (new.double() - old.double()).sum(dim=(2, 3, 4)) / voxels
                result[positions] += delta.to(result.dtype)[:, :, None, None, None]
            return result
        env = {a: self._dense(a, clean, values, count) if a in self.dependent else clean[a]
               for a in node.all_input_nodes}
        return self._call(node, env)

    def _call(self, node: fx.Node, env: dict) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _score(self, clean: dict, values: dict, boxes: dict, result: Any, part: slice,
               score: nn.Module) -> torch.Tensor:
        if not isinstance(result, fx.Node) or result not in values:
            raise Unsupported("its output is not a single tensor computed from the input")
        value = values[result]
        if not isinstance(value, _Local):
            return score.reduce(value)
        # A segmentation output changes only in its box: the score changes by the box's weighted difference.
        base = float(score.reduce(clean[result])[0])
        out = torch.full((len(value.lo),), base, dtype=torch.float64, device=clean[result].device)
        weights = score.weights[None]
        for positions, new in value.groups:
            size = tuple(new.shape[2:])
            old = self._gather(clean[result], np.zeros(3, np.int64), value.lo[positions], size)
            w = self._gather(weights, np.zeros(3, np.int64), value.lo[positions], size)
            change = ((score.activated(new) - score.activated(old)) * w).flatten(1).sum(1)
            out[positions] += change.double()
        return out.float()


def _tile_boxes(lo: np.ndarray, hi: np.ndarray, tile_lo: np.ndarray, tile_hi: np.ndarray,
                extent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows (extent coordinates, tensor order) as boxes of a tile's input, and which windows touch it.

    A tile that sticks out of the extent replicates the edge voxels (``crop_padded``), so an occluded edge voxel is
    occluded in its copies too: tile voxel t shows extent voxel clamp(t), and clamping keeps a box a box."""
    size = tile_hi - tile_lo
    t_lo = np.where(lo == 0, 0, lo - tile_lo).clip(0, size)
    t_hi = np.where(hi == extent, size, hi - tile_lo).clip(0, size)
    touched = np.all(t_hi > t_lo, axis=1)
    return t_lo, t_hi, touched


def occlusion_map(x: torch.Tensor, fill: torch.Tensor, tiles: list[tuple[Any, Callable[[], nn.Module]]], window: int,
                  stride: int, batch_size: int, tick: Callable[[float], None]) -> tuple[torch.Tensor, list[str]]:
    """Occlusion over an extent ``x`` (1, C, D, H, W) with windows filled from ``fill``, by incremental passes.

    ``tiles`` are the sliding-window tiles as (Box in extent coordinates, a function making the tile's
    ScoreModel, so that one tile's target weights are in memory at a time); the target score of an
    occluded extent is the sum of its tiles' scores, and a window changes only the tiles it touches. Returns the
    map (C, D, H, W) as Captum's ``Occlusion`` defines it (per voxel, the mean score drop over the windows covering
    it; every channel the same) and notes for the user. Raises :class:`Unsupported` before any model evaluation
    when the network cannot be followed, and on the first tile when its check against a full pass fails.
    """
    lo, hi = window_boxes(tuple(x.shape[2:]), window, stride)
    extent = np.array(x.shape[2:])
    engine = None
    occluded = torch.zeros(len(lo), dtype=torch.float64)
    clean_total = 0.0
    boxes = [_tile_boxes(lo, hi, *_tile_kji(tile), extent) for tile, _ in tiles]
    # Progress counts windows, however many tiles each one touches.
    scale = len(lo) / max(sum(int(touched.sum()) for _, _, touched in boxes), 1)
    for (tile, make_score), (t_lo, t_hi, touched) in zip(tiles, boxes):
        score = make_score()
        engine = engine or IncrementalOcclusion(score.network)
        device = score.weights.device
        x_tile, fill_tile = crop_padded(x, tile).to(device), crop_padded(fill, tile).to(device)
        with torch.no_grad(), autocast(device, score.precision):
            base = float(score.reduce(score.network(x_tile))[0])
        clean_total += base
        scores = torch.full((len(lo),), base, dtype=torch.float64)
        if touched.any():
            scores[torch.from_numpy(touched)] = engine.scores(
                x_tile, fill_tile, t_lo[touched], t_hi[touched], score, batch_size,
                lambda n: tick(n * scale)).double().cpu()
        occluded += scores
    drops = (clean_total - occluded).float()
    total = torch.zeros(tuple(x.shape[2:]))
    counts = torch.zeros(tuple(x.shape[2:]))
    for drop, a, b in zip(drops, lo, hi):
        total[_window(a, b)] += drop
        counts[_window(a, b)] += 1
    notes = []
    if engine.whole_map_layers:
        notes.append("Incremental occlusion ran layer(s) " + ", ".join(sorted(engine.whole_map_layers)) + " on "
                     "the whole feature map for every window (they mix the whole map, e.g. instance or group "
                     "normalisation): exact, but slower than a network of convolutions, pooling and batch norm.")
    return (total / counts)[None].expand(x.shape[1], -1, -1, -1).clone(), notes


def _tile_kji(tile: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.array(tile.lo[::-1]), np.array(tile.hi[::-1])
