"""The bound graph: an nn.Module captured once by ``torch.fx`` as a DAG of the ops pyibp can bound.

:func:`bound_graph` traces ``model.forward`` symbolically with a tracer that keeps the layers
pyibp knows (Linear, Conv, BatchNorm, pools, activations, Flatten, Dropout, Identity,
:class:`pyibp.nn.Normalize`) as single nodes, and normalises every form of an op (module,
``F.*``, ``torch.*``, tensor method, inplace) to one :class:`Node` kind. The graph holds the
modules themselves, never copies of their tensors: parameters, buffers and BatchNorm statistics
are read when the bounds are computed, so training sees its updates. It is cached per model and
re-captured when the model's structure (its modules or their forward methods) changes.

An op pyibp cannot bound, or a forward ``torch.fx`` cannot capture (data-dependent control
flow), is a TypeError naming the node, its op and target, and the line of the user's forward.
"""
from __future__ import annotations

import contextlib
import contextvars
import operator
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from ..nn import Normalize

__all__ = ["bound_graph", "BoundGraph", "Node", "batch_statistics", "batchnorm_scale_shift", "SUPPORTED_LAYERS"]

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.ELU, nn.Softplus, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU)
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
                    nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity, Normalize,
                    nn.LogSoftmax) + ACTIVATIONS
SUPPORTED_FUNCTIONS = ("+, - of two bounded tensors; + - * / by constants, parameters and buffers; "
                       "F.linear, F.conv1d, F.conv2d, F.relu, F.leaky_relu, F.relu6, F.hardtanh, F.elu, F.softplus, "
                       "torch.tanh, torch.sigmoid, F.gelu, F.silu (and their inplace forms), F.max_pool2d, F.avg_pool2d, "
                       "F.adaptive_avg_pool2d, F.pad (constant), F.dropout, F.log_softmax (as the last op), torch.cat, torch.flatten, torch.reshape, "
                       "torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.mean, indexing/slicing "
                       "(not of the batch dimension); methods view, reshape, flatten, permute, transpose, squeeze, "
                       "unsqueeze, contiguous, mean, relu, sigmoid, tanh, add, sub, mul, div, neg, size, dim")
_SUPPORTED = (", ".join(c.__name__ for c in SUPPORTED_LAYERS) + " modules (nested nn.Sequential and any module "
              "whose forward torch.fx can trace); " + SUPPORTED_FUNCTIONS)


@dataclass(eq=False)
class Node:
    """One op of the bound graph.

    Attributes:
        index: position in :attr:`BoundGraph.nodes` (a topological order).
        kind: the rule: ``"input"``, ``"const"`` (no bounded input: evaluated as PyTorch would),
            ``"linear"``, ``"conv"``, ``"affine"``, ``"relu"``, ``"activation"`` (any other activation: its
            IBP rule and relaxation are :mod:`pyibp.bounds.relaxations`', which know whether it is
            monotone), ``"avgpool"``,
            ``"adaptive_avgpool"``, ``"maxpool"``, ``"mean"``, ``"reshape"``, ``"index"``, ``"pad"``,
            ``"const_affine"``, ``"add"``, ``"sub"``, ``"cat"``, ``"identity"``.
        call: for ``"const"``/shape ops, the PyTorch call ``call(*args, **kwargs)``.
        config: a layer's configuration, read once at capture (a convolution's stride, padding,
            dilation, groups); its tensors are read at every call.
        args, kwargs: the fx arguments with every producer replaced by :class:`Ref`.
        inputs: indices of the bounded producers, in argument order.
        module: the layer the node reads its parameters from (live), if any.
        fuse_relu: a Linear/Conv whose only user is a ReLU: the pair runs as one fused operator.
        fused: a ReLU folded into its producer (when fusion is on, it passes that box through).
        where: the user's source line the node came from.
    """

    index: int
    name: str
    op: str
    target: Any
    kind: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: Tuple[int, ...] = ()
    module: Optional[nn.Module] = None
    call: Optional[Callable] = None
    config: Any = None
    fuse_relu: bool = False
    fused: bool = False
    where: str = ""

    def describe(self) -> str:
        """``node 'conv1' (call_module conv1: Conv2d) at model.py:12: x = self.conv1(x)``."""
        target = f"{self.target}: {type(self.module).__name__}" if self.op == "call_module" else _name_of(self.target)
        return f"node {self.name!r} ({self.op} {target})" + (f" at {self.where}" if self.where else "")


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of node ``index``."""

    index: int


@dataclass
class BoundGraph:
    """The captured DAG. ``output``: the index of the node the model returns. ``logits``: the node
    whose margins are the output's: the output, or the input of a final ``log_softmax`` (which
    shifts every logit by the same amount). ``last_linear``: the index of a final Linear whose
    output is the logits (through Identity/Dropout only), into which the margin specification is
    folded, or None."""

    nodes: List[Node]
    output: int
    logits: int
    last_linear: Optional[int]
    frees: List[List[int]] = field(default_factory=list)   # frees[i]: bounded nodes last used by node i

    def relus(self) -> Iterator[Node]:
        return (n for n in self.nodes if n.kind == "relu")

    def refined_nodes(self, stop: int) -> Dict[int, bool]:
        """The nodes before ``stop`` whose boxes CROWN tightens (:mod:`pyibp.bounds.intermediate`):
        ``{p: every neuron}`` for each node p an activation or MaxPool reads, True when one other
        than ReLU reads it (every neuron's bound matters then; for a ReLU, its unstable ones). A node
        IBP already bounds exactly is left out: one that depends on the input through at most one
        Linear/Conv and otherwise only elementwise affine maps and reshapes."""
        needs: Dict[int, bool] = {}
        for node in self.nodes[:stop]:
            if node.kind in _RELAXED_KINDS:
                p = node.inputs[0]
                needs[p] = needs.get(p, False) or node.kind != "relu"
        return {p: every for p, every in needs.items() if not self._exact_by_ibp(p)}

    def _exact_by_ibp(self, index: int) -> bool:
        mixing, stack, seen = 0, [index], set()
        while stack:
            node = self.nodes[stack.pop()]
            if node.index in seen:
                continue
            seen.add(node.index)
            if node.kind in ("linear", "conv"):
                mixing += 1
            elif node.kind not in _IBP_EXACT_KINDS:
                return False
            stack.extend(node.inputs)
        return mixing <= 1


_RELAXED_KINDS = ("relu", "activation", "maxpool")
# Ops through which IBP's centre-radius form loses nothing (with at most one Linear/Conv among them).
_IBP_EXACT_KINDS = ("input", "const", "reshape", "identity", "affine", "const_affine", "pad", "index")


def resolve(value: Any, env: List[Any]) -> Any:
    """``value`` with every :class:`Ref` replaced by its node's value in ``env``."""
    if type(value) is Ref:
        return env[value.index]
    if type(value) in (tuple, list):
        return type(value)(resolve(v, env) for v in value)
    if type(value) is dict:
        return {k: resolve(v, env) for k, v in value.items()}
    if type(value) is slice:
        return slice(resolve(value.start, env), resolve(value.stop, env), resolve(value.step, env))
    return value


# ---------------------------------------------------------------------------------------------
# capture
class _Tracer(fx.Tracer):
    """Keeps every torch.nn layer (and pyibp.nn.Normalize) as one call_module node, records the
    user's stack for error messages, and reads buffers through get_attr so they stay live."""

    record_stack_traces = True
    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def _user_line(stack: Optional[str]) -> str:
    """``file:line: code`` of the innermost frame outside torch in a stack trace."""
    frames = [f for f in _FRAME.findall(stack or "") if not f[0].startswith(_TORCH_DIR)]
    if not frames:
        return ""
    path, line, code = frames[-1]
    return f"{path}:{line}: {code.strip()}"


def _name_of(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if name == "fn" and "boolean_dispatch" in getattr(target, "__qualname__", ""):
        name = "max_pool2d"
    prefixes = {"torch.nn.functional": "F.", "torch._C._nn": "F.", "torch": "torch.", "_operator": "operator."}
    prefix = prefixes.get(module, "")
    return prefix + name if prefix or not module else f"{module}.{name}"


def _fn(name: str) -> Optional[Callable]:
    return getattr(F, name, None)


def _functions(*pairs) -> Dict[Any, Any]:
    return {f: v for fs, v in pairs for f in (fs if isinstance(fs, tuple) else (fs,)) if f is not None}


# Functional activations -> the module whose rule they share (arguments as in the F.* signature).
_ACTIVATION_FUNCTIONS = _functions(
    ((F.relu, torch.relu, torch.relu_, _fn("relu_")), lambda inplace=False: nn.ReLU()),
    ((F.leaky_relu, _fn("leaky_relu_")), lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope)),
    (F.relu6, lambda inplace=False: nn.ReLU6()),
    ((F.hardtanh, _fn("hardtanh_")), lambda min_val=-1.0, max_val=1.0, inplace=False: nn.Hardtanh(min_val, max_val)),
    ((F.elu, _fn("elu_")), lambda alpha=1.0, inplace=False: nn.ELU(alpha)),
    (F.softplus, lambda beta=1.0, threshold=20.0: nn.Softplus(beta, threshold)),
    ((torch.tanh, F.tanh, torch.tanh_), lambda: nn.Tanh()),
    ((torch.sigmoid, F.sigmoid, torch.sigmoid_), lambda: nn.Sigmoid()),
    (F.gelu, lambda approximate="none": nn.GELU(approximate)),
    (F.silu, lambda inplace=False: nn.SiLU()),
)
_ACTIVATION_METHODS = {"relu": nn.ReLU, "relu_": nn.ReLU, "tanh": nn.Tanh, "tanh_": nn.Tanh,
                       "sigmoid": nn.Sigmoid, "sigmoid_": nn.Sigmoid}
_POOL_FUNCTIONS = _functions((F.max_pool2d, nn.MaxPool2d), (F.avg_pool2d, nn.AvgPool2d),
                             (F.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d))
_RESHAPES = _functions(((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze), "reshape"),
                       ((torch.permute, torch.transpose, operator.getitem), "index"))
_RESHAPE_METHODS = {"view": "reshape", "reshape": "reshape", "flatten": "reshape", "squeeze": "reshape",
                    "unsqueeze": "reshape", "contiguous": "identity", "permute": "index", "transpose": "index"}
_ARITHMETIC = _functions(((operator.add, operator.iadd, torch.add), "add"),
                         ((operator.sub, operator.isub, torch.sub), "sub"),
                         ((operator.mul, operator.imul, torch.mul), "mul"),
                         ((operator.truediv, operator.itruediv, torch.div), "div"), ((operator.neg, torch.neg), "neg"))
_ARITHMETIC_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul",
                       "div": "div", "div_": "div", "neg": "neg", "neg_": "neg"}
_METADATA_METHODS = ("size", "dim")
_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim")


def _module_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return "conv"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, Normalize)):
        return "affine"
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, ACTIVATIONS):
        return "activation"
    if isinstance(module, nn.MaxPool2d):
        return "maxpool"
    if isinstance(module, nn.AvgPool2d):
        return "avgpool"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return "adaptive_avgpool"
    if isinstance(module, nn.Flatten):
        return "reshape"
    if isinstance(module, (nn.Dropout, nn.Identity)):
        return "identity"
    if isinstance(module, nn.LogSoftmax):
        return "log_softmax"
    return None


def _unsupported(node: Node, why: str = "") -> TypeError:
    return TypeError(f"pyibp cannot bound {node.describe()}{': ' + why if why else ''}. Supported: {_SUPPORTED}")


def _constant_args(node: Node, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    def check(v: Any) -> Any:
        if type(v) is Ref or (type(v) in (tuple, list) and any(type(u) is Ref for u in v)):
            raise _unsupported(node, "its arguments other than the input must be constants")
        return v
    return tuple(check(a) for a in args), {k: check(v) for k, v in kwargs.items()}


def _classify(node: Node, bounded: List[bool]) -> None:
    """Sets ``node.kind`` (and ``module``, ``call``) for a node with at least one bounded input."""
    op, target, args, kwargs = node.op, node.target, node.args, node.kwargs
    first_bounded = bool(args) and type(args[0]) is Ref and bounded[args[0].index]
    if op == "call_module":
        node.kind = _module_kind(node.module) or ""
        if not node.kind or node.module is None:
            raise _unsupported(node)
        if len(node.inputs) != 1 or not first_bounded:
            raise _unsupported(node, "a layer takes one bounded tensor")
        _check_module(node)
        if node.kind == "reshape":
            node.call = node.module
        return
    # Functional activations and pools become the module whose rule they share.
    as_module = _ACTIVATION_FUNCTIONS.get(target, _POOL_FUNCTIONS.get(target)) if op == "call_function" else None
    if as_module is not None:
        rest, kw = _constant_args(node, args[1:], kwargs)
        node.module = as_module(*rest, **kw)
        node.kind = _module_kind(node.module)
        _check_module(node)
        return
    if op == "call_method" and target in _ACTIVATION_METHODS and len(args) == 1:
        node.module, node.kind = _ACTIVATION_METHODS[target](), ("relu" if target.startswith("relu") else "activation")
        return
    if op == "call_function" and target in (F.linear, F.conv1d, F.conv2d):
        if not first_bounded or len(node.inputs) != 1:
            raise _unsupported(node, "only the input may be bounded; weight and bias must be constants")
        node.kind = "linear" if target is F.linear else "conv"
        node.call = target
        return
    if (op == "call_function" and target in _RESHAPES) or (op == "call_method" and target in _RESHAPE_METHODS):
        if not first_bounded or len(node.inputs) != 1:
            raise _unsupported(node, "its tensor arguments other than the input must be constants")
        node.kind = _RESHAPES[target] if op == "call_function" else _RESHAPE_METHODS[target]
        if target == "view":
            node.call = Tensor.reshape      # boxes may be laid out channels-last, where view cannot
        elif op == "call_method":
            node.call = getattr(Tensor, target)
        else:
            node.call = target
        return
    if op == "call_function" and target in (torch.cat, torch.concat, getattr(torch, "concatenate", None)):
        tensors = args[0] if args else kwargs.get("tensors")
        if not all(type(t) is Ref and bounded[t.index] for t in tensors):
            raise _unsupported(node, "every tensor joined by torch.cat must be bounded (derived from the input)")
        node.kind = "cat"
        return
    if op == "call_function" and target is F.pad:
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        if not first_bounded or mode != "constant" or len(node.inputs) != 1:
            raise _unsupported(node, f"only F.pad(x, pad, mode='constant', value=v) of the input is supported, "
                                     f"got mode={mode!r}")
        node.kind = "pad"
        return
    if (op == "call_function" and target in (F.log_softmax, torch.log_softmax)) or (
            op == "call_method" and target == "log_softmax"):
        node.kind = "log_softmax"
        return
    if (op == "call_function" and target is torch.mean) or (op == "call_method" and target == "mean"):
        node.kind = "mean"
        return
    if op == "call_function" and target in (F.dropout, getattr(F, "dropout1d", None), F.dropout2d, F.alpha_dropout):
        node.kind = "identity"
        return
    if op == "call_method" and target in _METADATA_METHODS:
        node.kind, node.call = "const", getattr(Tensor, target)
        return
    if op == "call_function" and target is getattr and len(args) == 2 and args[1] in _METADATA_ATTRIBUTES:
        node.kind, node.call = "const", target
        return
    arithmetic = (_ARITHMETIC.get(target) if op == "call_function" else
                  _ARITHMETIC_METHODS.get(target) if op == "call_method" else None)
    if arithmetic is not None:
        _classify_arithmetic(node, arithmetic, bounded)
        return
    raise _unsupported(node)


def _classify_arithmetic(node: Node, name: str, bounded: List[bool]) -> None:
    args = node.args
    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode") is not None or len(args) > 2:
        raise _unsupported(node, "alpha= and rounding_mode= are not supported")
    if name == "neg":
        node.kind = "const_affine"
        node.call = lambda: (-1.0, None)
        return
    is_bounded = [type(a) is Ref and bounded[a.index] for a in args]
    if all(is_bounded) and name in ("add", "sub"):
        node.kind = name
        return
    if all(is_bounded):
        raise _unsupported(node, f"{name} of two bounded tensors is not linear")
    node.kind = "const_affine"
    if is_bounded[0]:
        # x*c, x/c, x+c, x-c as x * scale + shift, the constant as the second argument
        node.call = {"add": lambda c: (None, c), "sub": lambda c: (None, -c), "mul": lambda c: (c, None),
                     "div": lambda c: (1.0 / c, None)}[name]
    else:
        if name == "div":
            raise _unsupported(node, "division by a bounded tensor is not linear")
        node.call = {"add": lambda c: (None, c), "sub": lambda c: (-1.0, c), "mul": lambda c: (c, None)}[name]


def _check_module(node: Node) -> None:
    """Structural conditions under which a supported layer has a sound bound (checked at capture)."""
    m = node.module
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding_mode != "zeros":
        raise TypeError(f"{node.describe()} has padding_mode={m.padding_mode!r}; only 'zeros' is supported")
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        node.config = (list(m.stride), conv_padding(node, m.padding, m.dilation, m.kernel_size), list(m.dilation),
                       m.groups)
    if isinstance(m, nn.MaxPool2d) and m.return_indices:
        raise TypeError(f"{node.describe()} has return_indices=True; only plain max pooling is supported")
    if isinstance(m, nn.LeakyReLU) and m.negative_slope < 0:
        raise TypeError(f"{node.describe()} has negative_slope={m.negative_slope}; the bounds need a monotone "
                        "activation (negative_slope >= 0)")
    if isinstance(m, nn.ELU) and m.alpha < 0:
        raise TypeError(f"{node.describe()} has alpha={m.alpha}; the bounds need a monotone activation (alpha >= 0)")
    if isinstance(m, nn.Hardtanh) and m.min_val > m.max_val:
        raise TypeError(f"{node.describe()} has min_val={m.min_val} > max_val={m.max_val}")
    if isinstance(m, nn.Softplus) and m.beta <= 0:
        raise TypeError(f"{node.describe()} has beta={m.beta}; the bounds need beta > 0")


def conv_padding(node: Node, padding, dilation, kernel_size) -> List[int]:
    """The symmetric integer padding of a convolution, resolving the string forms 'valid' and 'same'."""
    if not isinstance(padding, str):
        return [padding] * len(kernel_size) if isinstance(padding, int) else list(padding)
    if padding == "valid":
        return [0] * len(kernel_size)
    total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
    if any(t % 2 for t in total):
        raise TypeError(f"{node.describe()} uses padding='same' with an even kernel extent, which pads "
                        "asymmetrically; use an odd kernel size or explicit integer padding")
    return [t // 2 for t in total]


def _trace(model: nn.Module) -> Tuple[fx.Graph, nn.Module]:
    # A single layer (torch.nn's or Normalize) is bounded as the one-layer graph it is.
    root = nn.Sequential(model) if _Tracer().is_leaf_module(model, "") else model
    try:
        return _Tracer().trace(root), root
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, ... on what it cannot capture
        frames = [f for f in _FRAME.findall("".join(traceback.format_tb(err.__traceback__)))
                  if not f[0].startswith(_TORCH_DIR) and not f[0].startswith(os.path.dirname(__file__))]
        where = f" at {frames[-1][0]}:{frames[-1][1]}: {frames[-1][2].strip()}" if frames else ""
        raise TypeError(f"pyibp could not capture {type(model).__name__}.forward with torch.fx{where}: "
                        f"{type(err).__name__}: {err}. The forward must be traceable: no control flow that "
                        f"depends on tensor values. Supported: {_SUPPORTED}") from err


def _capture(model: nn.Module) -> BoundGraph:
    graph, root = _trace(model)
    fx_nodes = list(graph.nodes)
    outputs = [n for n in fx_nodes if n.op == "output"]
    # Keep the nodes the output depends on, in fx's (topological) order.
    live = set()
    stack = [outputs[0]]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    placeholders = [n for n in fx_nodes if n.op == "placeholder"]
    index: Dict[fx.Node, int] = {}
    nodes: List[Node] = []
    bounded: List[bool] = []
    to_ref = lambda a: fx.node.map_arg(a, lambda n: Ref(index[n]))  # noqa: E731
    for fx_node in fx_nodes:
        if fx_node not in live or fx_node.op == "output":
            continue
        node = Node(len(nodes), fx_node.name, fx_node.op, fx_node.target, "", where=_user_line(
            fx_node.meta.get("stack_trace")))
        if fx_node.op == "placeholder":
            if fx_node is not placeholders[0]:
                raise TypeError(f"pyibp bounds models with one input tensor; {type(model).__name__}.forward takes "
                                f"another argument {fx_node.target!r} that the output depends on")
            node.kind = "input"
        else:
            node.args, node.kwargs = to_ref(tuple(fx_node.args)), to_ref(dict(fx_node.kwargs))
            node.inputs = tuple(index[n] for n in fx_node.all_input_nodes if bounded[index[n]])
            if fx_node.op == "call_module":
                node.module = root.get_submodule(fx_node.target)
            if fx_node.op == "get_attr":
                owner, _, attr = fx_node.target.rpartition(".")
                node.kind, node.module, node.call = "const", root.get_submodule(owner), attr
            elif not node.inputs:
                node.kind = "const"
            else:
                _classify(node, bounded)
        index[fx_node] = len(nodes)
        nodes.append(node)
        bounded.append(node.kind not in ("const",))
    result = outputs[0].args[0]
    if not isinstance(result, fx.Node) or not bounded[index[result]]:
        raise TypeError(f"pyibp bounds models that return one tensor computed from the input; "
                        f"{type(model).__name__}.forward returns {type(result).__name__}")
    output = index[result]
    _mark_fusions(nodes)
    frees: List[List[int]] = [[] for _ in nodes]
    for i, users in enumerate(_users(nodes)):
        if users and nodes[i].kind != "const":
            frees[max(users)].append(i)
    logits = _logits(nodes, output)
    return BoundGraph(nodes, output, logits, _last_linear(nodes, logits), frees)


def _logits(nodes: List[Node], output: int) -> int:
    """The output, or the input of a final log_softmax; a log_softmax anywhere else is refused."""
    i = output
    while nodes[i].kind == "identity":
        i = nodes[i].inputs[0]
    final = i if nodes[i].kind == "log_softmax" else None
    for node in nodes:
        if node.kind == "log_softmax" and node.index != final:
            raise _unsupported(node, "log_softmax is supported as the model's last op only (where the "
                                     "margins are those of its input)")
    return nodes[final].inputs[0] if final is not None else output


def _users(nodes: List[Node]) -> List[List[int]]:
    users: List[List[int]] = [[] for _ in nodes]
    for node in nodes:
        for i in set(node.inputs):
            users[i].append(node.index)
    return users


def _mark_fusions(nodes: List[Node]) -> None:
    users = _users(nodes)
    for node in nodes:
        if node.kind in ("linear", "conv") and len(users[node.index]) == 1:
            user = nodes[users[node.index][0]]
            if user.kind == "relu":
                node.fuse_relu, user.fused = True, True


def _last_linear(nodes: List[Node], output: int) -> Optional[int]:
    users = _users(nodes)
    i = output
    while nodes[i].kind == "identity" and len(users[nodes[i].inputs[0]]) == 1:
        i = nodes[i].inputs[0]
    node = nodes[i]
    if node.kind == "linear" and not node.fuse_relu and (i == output or len(users[i]) == 1):
        return i
    return None


def _structure(model: nn.Module) -> tuple:
    """What a captured graph depends on: the module tree (its names, objects, types and forward
    methods), walked through ``_modules`` directly (``named_modules`` costs several times more,
    and this runs on every bound)."""
    key, stack = [], [model]
    while stack:
        m = stack.pop()
        children = m._modules
        key.append((id(m), type(m), m.__dict__.get("forward"), tuple(children)))
        stack.extend(c for c in children.values() if c is not None)
    return tuple(key)


class _Captured:
    """A model's bound graph and the structure it was captured for, kept on the model itself (so
    that it lives and dies with it, and torch.compile guards on it like on any module attribute).
    Pickling or copying the model drops it: the copy captures its own graph."""

    def __init__(self, key: tuple = (), graph: Optional[BoundGraph] = None):
        self.key, self.graph = key, graph

    def __reduce__(self):
        return (_Captured, ())


_ATTRIBUTE = "_pyibp_bound_graph"


def bound_graph(model: nn.Module) -> BoundGraph:
    """The bound graph of ``model``, captured on first use and reused while its structure is unchanged.

    A DistributedDataParallel (or other pyibp-known) wrapper is looked through. The forward is
    captured in eval mode: bounds are those of the network in eval mode (Dropout is the identity,
    BatchNorm a fixed affine map), also where a forward branches on ``self.training``.

    Raises:
        TypeError: an op pyibp cannot bound, or a forward torch.fx cannot trace; the message names
            the node, its op and target, and the line of the forward it came from.
    Example:
        >>> g = bound_graph(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        >>> [n.kind for n in g.nodes]
        ['input', 'reshape', 'linear', 'relu', 'linear']
    """
    model = unwrap(model)
    _ensure_captured(model, _structure(model))
    return getattr(model, _ATTRIBUTE).graph


# torch.compile runs this eagerly while tracing (the graph is Python structure, not tensors), so
# that compiling a bound computation of a model never seen before has no graph break.
@torch._dynamo.assume_constant_result
def _ensure_captured(model: nn.Module, key: tuple) -> bool:
    captured = model.__dict__.get(_ATTRIBUTE)
    if captured is None or captured.graph is None or captured.key != key:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            model.__dict__[_ATTRIBUTE] = _Captured(key, _capture(model))
        finally:
            for m, training in modes:
                m.training = training
    return True


# ---------------------------------------------------------------------------------------------
# parameters, read live
def linear_params(node: Node, env: List[Any]) -> Tuple[Tensor, Optional[Tensor]]:
    """``(weight (K, F), bias (K,) or None)`` of a Linear module or an ``F.linear`` call."""
    if node.module is not None:
        return node.module.weight, node.module.bias
    args, kwargs = (None,) + resolve(node.args[1:], env), resolve(node.kwargs, env)
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    return weight, args[2] if len(args) > 2 else kwargs.get("bias")


@dataclass
class ConvParams:
    weight: Tensor
    bias: Optional[Tensor]
    stride: List[int]
    padding: List[int]
    dilation: List[int]
    groups: int


def conv_params(node: Node, env: List[Any]) -> ConvParams:
    """The parameters of a Conv1d/Conv2d module or an ``F.conv1d``/``F.conv2d`` call, as lists of
    one entry per spatial dimension."""
    m = node.module
    if m is not None:       # the layer's configuration, read at capture; its tensors, now
        stride, padding, dilation, groups = node.config
        return ConvParams(m.weight, m.bias, stride, padding, dilation, groups)
    args, kwargs = (None,) + resolve(node.args[1:], env), resolve(node.kwargs, env)
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    values = dict(zip(names, args), **kwargs)
    weight = values["weight"]
    dims = weight.dim() - 2
    per_dim = lambda v: [v] * dims if isinstance(v, int) else list(v)  # noqa: E731
    dilation = per_dim(values.get("dilation", 1))
    return ConvParams(weight, values.get("bias"), per_dim(values.get("stride", 1)),
                      conv_padding(node, values.get("padding", 0), dilation, list(weight.shape[2:])),
                      dilation, values.get("groups", 1))


# ---------------------------------------------------------------------------------------------
# BatchNorm: the affine map it applies, with running or recorded batch statistics
_BATCH_STATISTICS: contextvars.ContextVar[Optional[Dict[nn.Module, Tuple[Tensor, Tensor]]]] = \
    contextvars.ContextVar("pyibp_batch_statistics", default=None)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[Dict[nn.Module, Tuple[Tensor, Tensor]]]:
    """Bounds inside the block treat each BatchNorm of ``model`` as the affine map of the batch
    statistics its last training-mode forward pass in the block normalised with, instead of its
    running statistics (Shi et al. 2021, like auto_LiRPA in training mode).

    That is the map the clean forward pass of a training step applies, so during certified
    training the bounds follow the network being trained rather than the running averages, which
    lag behind it. The statistics keep their graph: gradients flow through them as through the
    clean pass. The bounds are those of the network with the statistics fixed: a training signal,
    not a certificate for the model in eval mode (verify in eval mode, with running statistics).

    Yields:
        The dict ``layer -> (mean, variance)`` (C,) being filled.
    Example:
        >>> with batch_statistics(model) as stats:
        ...     logits = model.train()(x)                           # records each BatchNorm's statistics
        ...     with eval_mode(model):
        ...         m = pyibp.margin_bounds(model, x, y, 0.1)       # bounds with those statistics
    """
    stats: Dict[nn.Module, Tuple[Tensor, Tensor]] = {}

    def record(layer: nn.Module, inputs: Tuple[Tensor, ...]) -> None:
        if layer.training:
            x = inputs[0]
            dims = [0] + list(range(2, x.dim()))
            stats[layer] = (x.mean(dims), x.var(dims, unbiased=False))

    layers = [m for m in unwrap(model).modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    token = _BATCH_STATISTICS.set(stats)
    try:
        yield stats
    finally:
        _BATCH_STATISTICS.reset(token)
        for handle in handles:
            handle.remove()


def affine_scale_shift(node: Node, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """BatchNorm or Normalize as ``x * scale + shift`` per channel (C,): BatchNorm with its running
    statistics (eval mode), or inside :func:`batch_statistics` with the batch statistics recorded there.
    ``dtype``: compute the map in this dtype from the layer's tensors cast to it (None: theirs).

    Raises ValueError for a BatchNorm with no fixed affine map (training mode, no running statistics).
    """
    layer = node.module
    if isinstance(layer, Normalize):
        if dtype is None:
            return layer.scale_shift()
        std, mean = layer.std.to(dtype), layer.mean.to(dtype)
        return 1.0 / std, -mean / std
    stats = _BATCH_STATISTICS.get()
    recorded = stats is not None and layer in stats
    if layer.training:
        raise ValueError(f"{node.describe()} is in training mode, where it normalises by batch statistics and "
                         "has no fixed per-channel affine map to bound; call model.eval() first")
    if layer.running_mean is None and not recorded:
        raise ValueError(f"{node.describe()} has track_running_stats=False, so it has no fixed affine map to "
                         "bound; use track_running_stats=True (or train with batch statistics, "
                         "pyibp.batch_statistics)")
    return batchnorm_scale_shift(layer, dtype)


def per_channel(tensors: Tuple[Tensor, ...], channels: int) -> Tuple[Tensor, ...]:
    """An affine map's tensors (C,) for ``channels`` channels: a Normalize of one channel
    (``Normalize([m], [s])``) broadcasts over all of them, as its forward does."""
    return tuple(t.expand(channels) if t.numel() == 1 else t for t in tensors)


def batchnorm_scale_shift(layer: nn.modules.batchnorm._BatchNorm, dtype: Optional[torch.dtype] = None
                          ) -> Tuple[Tensor, Tensor]:
    """BatchNorm as ``x * scale + shift`` per channel: with its running statistics (eval mode), or
    inside :func:`batch_statistics` with the batch statistics recorded there; in ``dtype`` if given."""
    stats = _BATCH_STATISTICS.get()
    mean, var = stats[layer] if stats is not None and layer in stats else (layer.running_mean, layer.running_var)
    weight, bias = layer.weight, layer.bias
    if dtype is not None:
        mean, var, weight, bias = (t if t is None else t.to(dtype) for t in (mean, var, weight, bias))
    scale = (var + layer.eps).rsqrt()
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift
