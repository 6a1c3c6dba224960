"""Eager twins of TorchScript models, so that layer methods (CAMs, LRP, DeepLIFT, guided backprop) can hook them.

A TorchScript module runs its graph in C++: Python forward hooks on it or on its submodules never fire, and LRP's
rules and Captum's DeepLIFT recognise layers by their ``torch.nn`` class. Yet a scripted or traced model keeps its
submodules, their ``original_name`` and their weights, and the graph of every ``forward``. :func:`eager_twin`
rebuilds the model as ordinary Python modules from these:

* a leaf of a known ``torch.nn`` type becomes that module, configured from the attributes ``torch.jit.script``
  keeps (stride, padding, eps...) or, for a traced leaf, which keeps only its weights, from the constant
  arguments of the one operator in its graph; its parameters and buffers are copied;
* a module whose ``forward`` calls each of its children once, each on the previous one's output, becomes an
  ``nn.Sequential`` of the rebuilt children (LRP merges a BatchNorm into the convolution before it there);
* any other ``forward`` (skips and concatenations of a U-Net, for example) is replayed node by node from its graph
  by :class:`GraphModule`: operators through ``torch.ops``, submodule calls through the rebuilt children.

Submodules keep their names, so a layer is named as in the original network (``features.block4.conv2``). Control
flow (``prim::If``, ``prim::Loop``), calls of functions or of methods other than ``forward``, and operators that
have no ``torch.ops`` entry stop the rebuild, with the reason. A twin is only used when it reproduces the compiled
model's output on a random probe; :class:`EagerTwin` carries the measured difference or the reason there is none.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["EagerTwin", "GraphModule", "eager_twin", "TWIN_TOLERANCE"]

TWIN_TOLERANCE = 1e-5
"""Largest difference from the compiled model's output allowed for a twin, relative to the output's largest value."""


class _Unsupported(Exception):
    """The module cannot be rebuilt; the message says which node or module and why."""


@dataclass(frozen=True)
class EagerTwin:
    """The outcome of :func:`eager_twin`: the eager ``module`` and its largest absolute difference from the
    compiled model on the probe, or ``module`` None and the ``reason`` in words."""

    module: nn.Module | None
    max_difference: float | None = None
    reason: str | None = None


def eager_twin(scripted: torch.jit.ScriptModule, probe: torch.Tensor) -> EagerTwin:
    """Rebuild ``scripted`` (in eval mode, on the CPU) as Python modules and check it on ``probe`` (N, C, D, H, W).

    The twin is accepted when its output has the compiled model's shape and differs from it by at most
    :data:`TWIN_TOLERANCE` times the output's largest magnitude (same operators in the same order: in practice 0).
    """
    try:
        twin = _rebuild(scripted, "")
    except _Unsupported as exc:
        return EagerTwin(None, reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a compiled module of a kind not foreseen: no twin, and why
        return EagerTwin(None, reason=f"rebuilding it failed ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    twin.eval()
    with torch.no_grad():
        try:
            expected = scripted(probe)
        except Exception as exc:  # noqa: BLE001 - the model itself does not take this input: nothing to compare
            return EagerTwin(None, reason=f"the model itself fails on a {tuple(probe.shape)} probe "
                                          f"({_last_line(exc)}); give input_channels and patch_size that fit it "
                                          "in its model card")
        try:
            got = twin(probe)
        except Exception as exc:  # noqa: BLE001 - any failure of the replay means no twin; say what it was
            return EagerTwin(None, reason=f"its rebuilt layers fail on a {tuple(probe.shape)} probe "
                                          f"({_last_line(exc)})")
    if not (isinstance(expected, torch.Tensor) and isinstance(got, torch.Tensor)) or got.shape != expected.shape:
        return EagerTwin(None, reason="its rebuilt layers return another output than the compiled model")
    difference = float((got - expected).abs().max()) if expected.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not difference <= TWIN_TOLERANCE * max(scale, 1.0):
        return EagerTwin(None, reason=f"its rebuilt layers differ from the compiled model by up to {difference:.3g} "
                                      f"on a probe (outputs up to {scale:.3g})")
    return EagerTwin(twin, max_difference=difference)


def _last_line(exc: BaseException) -> str:
    # TorchScript puts the real cause of a failure last, under its own traceback.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------------------ leaves
class _LeafConfig:
    """A leaf's configuration: a scripted module's attribute, else a constant argument of a traced leaf's operator."""

    def __init__(self, module: torch.jit.ScriptModule, path: str):
        self.module, self.path = module, path
        self._operator: torch._C.Node | None = None

    def __call__(self, name: str, index: int | None) -> Any:
        if hasattr(self.module, name):
            return getattr(self.module, name)
        if index is None:
            return self.input_channels(name)
        return _constant(self.operator().inputsAt(index), self.path)

    def input_channels(self, name: str) -> int:
        """Channels of the input a traced leaf saw (its graph records the traced sizes), for settings a traced
        module does not keep, such as a non-affine InstanceNorm's num_features."""
        sizes = list(self.module.graph.inputs())[1].type().sizes() if self.module._c._has_method("forward") else None
        if not sizes or len(sizes) < 2 or sizes[1] is None:
            raise _Unsupported(f"the {name} of its {self.module.original_name} {self.path!r} is not recorded "
                               "(a traced module keeps only its weights)")
        return int(sizes[1])

    def operator(self) -> torch._C.Node:
        if self._operator is None:
            nodes = [node for node in self.module.graph.nodes()
                     if node.kind() not in ("prim::Constant", "prim::ListConstruct", "prim::GetAttr")]
            if len(nodes) != 1:
                raise _Unsupported(f"its {self.module.original_name} {self.path!r} computes "
                                   f"{', '.join(n.kind() for n in nodes) or 'nothing'} rather than one operator")
            self._operator = nodes[0]
        return self._operator


def _constant(value: torch._C.Value, path: str) -> Any:
    node = value.node()
    if node.kind() == "prim::Constant":
        return value.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [_constant(item, path) for item in node.inputs()]
    raise _Unsupported(f"a setting of {path!r} is computed at run time ({node.kind()})")


def _tensor(module: torch.jit.ScriptModule, name: str) -> torch.Tensor | None:
    """A parameter or buffer of the module itself; None when absent (a traced module drops ``bias = None``)."""
    own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    return own.get(name)


_Builder = Callable[[torch.jit.ScriptModule, _LeafConfig], nn.Module]


def _conv(cls: type[nn.Module], transposed: bool) -> _Builder:
    # aten::_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
    def build(module: torch.jit.ScriptModule, config: _LeafConfig) -> nn.Module:
        weight, groups = _tensor(module, "weight"), int(config("groups", 8))
        channels_in, channels_out = ((weight.shape[0], weight.shape[1] * groups) if transposed
                                     else (weight.shape[1] * groups, weight.shape[0]))
        extra = {"output_padding": tuple(config("output_padding", 7))} if transposed else {
            "padding_mode": getattr(module, "padding_mode", "zeros")}
        padding = config("padding", 4)
        return cls(channels_in, channels_out, tuple(weight.shape[2:]), stride=tuple(config("stride", 3)),
                   padding=padding if isinstance(padding, str) else tuple(padding),
                   dilation=tuple(config("dilation", 5)), groups=groups,
                   bias=_tensor(module, "bias") is not None, **extra)
    return build


def _norm(cls: type[nn.Module]) -> _Builder:
    # aten::batch_norm / aten::instance_norm(input, weight, bias, running_mean, running_var, flag, momentum, eps, ...)
    def build(module: torch.jit.ScriptModule, config: _LeafConfig) -> nn.Module:
        weight, statistics = _tensor(module, "weight"), _tensor(module, "running_mean")
        sized = weight if weight is not None else statistics
        features = sized.shape[0] if sized is not None else config("num_features", None)
        return cls(features, eps=float(config("eps", 7)), momentum=config("momentum", 6), affine=weight is not None,
                   track_running_stats=statistics is not None)
    return build


def _group_norm(module: torch.jit.ScriptModule, config: _LeafConfig) -> nn.Module:
    # aten::group_norm(input, num_groups, weight, bias, eps, cudnn_enabled)
    weight = _tensor(module, "weight")
    channels = weight.shape[0] if weight is not None else config("num_channels", None)
    return nn.GroupNorm(int(config("num_groups", 1)), int(channels), eps=float(config("eps", 4)),
                        affine=weight is not None)


def _configured(cls: type[nn.Module], names: tuple[str, ...] = ()) -> _Builder:
    # Pooling, flatten, dropout...: their operator takes the constructor's settings in order, after the input.
    def build(module: torch.jit.ScriptModule, config: _LeafConfig) -> nn.Module:
        values = [config(name, index) for index, name in enumerate(names, start=1)]
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in zip(names, values)})
    return build


def _linear(module: torch.jit.ScriptModule, config: _LeafConfig) -> nn.Module:
    weight = _tensor(module, "weight")
    return nn.Linear(weight.shape[1], weight.shape[0], bias=_tensor(module, "bias") is not None)


_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

_SETTINGS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MaxPool1d: _MAX_POOL, nn.MaxPool2d: _MAX_POOL, nn.MaxPool3d: _MAX_POOL,
    nn.AvgPool1d: _AVG_POOL[:5], nn.AvgPool2d: _AVG_POOL, nn.AvgPool3d: _AVG_POOL,
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveAvgPool3d: ("output_size",), nn.Flatten: ("start_dim", "end_dim"),
    nn.Dropout: ("p",), nn.Dropout1d: ("p",), nn.Dropout2d: ("p",), nn.Dropout3d: ("p",),
    nn.LeakyReLU: ("negative_slope",), nn.Softmax: ("dim",),
    # Never in-place: hooks need the pre-activation values.
    nn.ReLU: (), nn.Sigmoid: (), nn.Tanh: (), nn.Identity: (),
}

_LEAVES: dict[str, _Builder] = {
    **{cls.__name__: _conv(cls, False) for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{cls.__name__: _conv(cls, True) for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    **{cls.__name__: _norm(cls) for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                                            nn.InstanceNorm2d, nn.InstanceNorm3d)},
    **{cls.__name__: _configured(cls, names) for cls, names in _SETTINGS.items()},
    "Linear": _linear, "GroupNorm": _group_norm,
}


def _rebuild_leaf(module: torch.jit.ScriptModule, path: str) -> nn.Module:
    eager = _LEAVES[module.original_name](module, _LeafConfig(module, path))
    try:
        eager.load_state_dict(module.state_dict(), strict=True)
    except RuntimeError as exc:
        raise _Unsupported(f"the weights of its {module.original_name} {path!r} do not fit a rebuilt one") from exc
    return eager


# -------------------------------------------------------------------------------------------- containers
def _rebuild(module: torch.jit.ScriptModule, path: str) -> nn.Module:
    children = OrderedDict((name, _rebuild(child, f"{path}.{name}" if path else name))
                           for name, child in module.named_children())
    has_forward = module._c._has_method("forward")
    if not children and module.original_name in _LEAVES and has_forward:
        return _rebuild_leaf(module, path or "the model")
    # ModuleList, ModuleDict and modules a trace never ran: only reached through their parent's graph, if at all.
    if not has_forward:
        container = nn.Module()
        for name, child in children.items():
            container.add_module(name, child)
        _copy_tensors(module, container)
        container.original_name = module.original_name
        return container
    order = _chain(module.graph, set(children))
    if order is not None and sorted(order) == sorted(children) and not _own_tensors(module):
        chain = nn.Sequential(OrderedDict((name, children[name]) for name in order))
        chain.original_name = module.original_name  # what `ctxai layers` calls it: the network's own class
        return chain
    return GraphModule(module, children, path)


def _copy_tensors(scripted: torch.jit.ScriptModule, module: nn.Module) -> None:
    """Copy the scripted module's own parameters and buffers (not its children's) onto ``module``."""
    for name, parameter in scripted.named_parameters(recurse=False):
        module.register_parameter(name, nn.Parameter(parameter.detach().clone(), parameter.requires_grad))
    for name, buffer in scripted.named_buffers(recurse=False):
        module.register_buffer(name, buffer.detach().clone())


def _own_tensors(module: torch.jit.ScriptModule) -> bool:
    return any(True for _ in module.named_parameters(recurse=False)) or any(
        True for _ in module.named_buffers(recurse=False))


def _chain(graph: torch._C.Graph, children: set[str]) -> list[str] | None:
    """The children a forward calls, in order, when it is ``x -> child1 -> child2 -> ... -> return``; else None."""
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        return None
    self_value, current = inputs
    modules: dict[int, str] = {}
    order: list[str] = []
    for node in graph.nodes():
        kind = node.kind()
        if kind == "prim::Constant":
            continue
        if kind == "prim::GetAttr" and node.input().unique() == self_value.unique() and node.s("name") in children:
            modules[node.output().unique()] = node.s("name")
            continue
        arguments = list(node.inputs())
        if (kind == "prim::CallMethod" and node.s("name") == "forward" and len(arguments) == 2
                and arguments[0].unique() in modules and arguments[1].unique() == current.unique()
                and len(current.uses()) == 1):
            order.append(modules[arguments[0].unique()])
            current = node.output()
            continue
        return None
    returned = list(graph.return_node().inputs())
    return order if len(returned) == 1 and returned[0].unique() == current.unique() else None


class GraphModule(nn.Module):
    """A module that replays the ``forward`` graph of a TorchScript module with Python modules as its children.

    ``children`` are the rebuilt submodules by name; the scripted module's own parameters and buffers are copied.
    Built once: every node is translated at construction, so an unsupported one is reported before any run.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, children: dict[str, nn.Module], path: str = ""):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        _copy_tensors(scripted, self)
        self.original_name = scripted.original_name
        graph = scripted.graph
        where = f"{scripted.original_name} {path!r}" if path else scripted.original_name
        inputs = list(graph.inputs())
        self._self = inputs[0].unique()
        self._inputs = [value.unique() for value in inputs[1:]]
        self._steps = [self._step(node, scripted, where) for node in graph.nodes()]
        self._outputs = [value.unique() for value in graph.return_node().inputs()]

    def forward(self, *inputs: Any) -> Any:
        values: dict[int, Any] = {self._self: self}
        values.update(zip(self._inputs, inputs))
        for run, arguments, outputs in self._steps:
            result = run(*[values[a] for a in arguments])
            if len(outputs) == 1:
                values[outputs[0]] = result
            else:
                values.update(zip(outputs, result))
        return values[self._outputs[0]] if len(self._outputs) == 1 else tuple(values[o] for o in self._outputs)

    def _step(self, node: torch._C.Node, scripted: torch.jit.ScriptModule, where: str) -> tuple:
        kind = node.kind()
        arguments = [value.unique() for value in node.inputs()]
        outputs = [value.unique() for value in node.outputs()]
        if kind == "prim::Constant":
            value = node.output().toIValue()
            if isinstance(value, torch.Tensor):  # a buffer, so that moving the module moves it
                name = f"_constant_{outputs[0]}"
                self.register_buffer(name, value.detach().clone(), persistent=False)
                return (lambda module: getattr(module, name)), [self._self], outputs
            return (lambda: value), [], outputs
        if kind == "prim::GetAttr":
            name = node.s("name")
            if arguments[0] == self._self and not hasattr(self, name):
                value = getattr(scripted, name)  # a plain attribute of the scripted module (an int, a flag)
                return (lambda _module: value), arguments, outputs
            return (lambda module: getattr(module, name)), arguments, outputs
        if kind == "prim::CallMethod":
            # A traced module run twice gets forward1, forward2...: the same module on other inputs.
            if not re.fullmatch(r"forward\d*", node.s("name")):
                raise _Unsupported(f"its {where} calls method {node.s('name')!r}{_line(node)}, which CTXAI cannot "
                                   "replay (only forward calls)")
            return (lambda module, *args: module(*args)), arguments, outputs
        if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            make = list if kind == "prim::ListConstruct" else tuple
            return (lambda *items: make(items)), arguments, outputs
        if kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            return (lambda sequence: tuple(sequence)), arguments, outputs
        if kind == "prim::TupleIndex":
            return (lambda sequence, index: sequence[index]), arguments, outputs
        if kind.startswith("aten::"):
            return _operator(node, where), arguments, outputs
        if kind in ("prim::If", "prim::Loop"):
            raise _Unsupported(f"its {where} has control flow ({kind}{_line(node)}), so its sequence of layers "
                               "is decided at run time")
        raise _Unsupported(f"its {where} uses {kind}{_line(node)}, which CTXAI cannot replay as Python")


def _operator(node: torch._C.Node, where: str) -> Callable[..., Any]:
    schema_text = node.schema()
    if schema_text == "(no schema)":
        raise _Unsupported(f"its {where} uses {node.kind()}{_line(node)} without a schema")
    schema = torch._C.parse_schema(schema_text)
    try:
        packet = getattr(torch.ops.aten, schema.name.split("::", 1)[1])
        overload = getattr(packet, schema.overload_name or "default")
    except (AttributeError, RuntimeError) as exc:
        raise _Unsupported(f"its {where} uses {schema.name}{_line(node)}, which has no Python operator") from exc
    keywords = [argument.name if argument.kwarg_only else None for argument in schema.arguments]

    def call(*args: Any) -> Any:
        positional = [a for a, k in zip(args, keywords) if k is None]
        return overload(*positional, **{k: a for a, k in zip(args, keywords) if k is not None})
    return call


def _line(node: torch._C.Node) -> str:
    """`` at file.py:123`` when the node's source is known, so the statement points at the model's line: scripted
    nodes cite ``File "file.py", line 123``, traced ones ``file.py(123): forward``."""
    found = _SOURCE.search(node.sourceRange())
    if found is None:
        return ""
    file, line = (found["file"], found["line"]) if found["file"] else (found["tfile"], found["tline"])
    return f" at {file.rsplit('/', 1)[-1]}:{line}"


_SOURCE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)|^(?P<tfile>\S+?)\((?P<tline>\d+)\):', re.M)
