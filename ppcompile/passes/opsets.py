"""Every op set the passes match node targets against, and each op's spellings, in one place.

A graph holds one op under several spellings: `x * y` is operator.mul, `torch.mul(x, y)` torch.mul,
`x.mul(y)` the call_method "mul". SPELLINGS lists, once per op, the spellings the passes match it
by; an op set is the union of its ops' spellings (`ops("mul", "add")`). A set matches what is
listed and nothing else: a spelling added to an op's entry is matched by every set that holds the op.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

# where each kind of spelling lives ("method" and "aten" are handled apart)
_MODULES = {"torch": torch, "Tensor": torch.Tensor, "F": F, "operator": operator}


def spellings(name: str, kinds: str) -> frozenset:
    """The spellings of op `name` of each kind in `kinds` (space-separated): torch (torch.<name>),
    Tensor (torch.Tensor.<name>), F (torch.nn.functional.<name>), operator (operator.<name>),
    method ("<name>", a call_method target), aten (torch.ops.aten.<name>.default). A kind names
    its own attribute where the op's differs there: "operator=truediv" (Python's / for div)."""
    out = set()
    for kind in kinds.split():
        kind, _, attr = kind.partition("=")
        attr = attr or name
        if kind == "method":
            out.add(attr)
        elif kind == "aten":
            out.add(getattr(torch.ops.aten, attr).default)
        else:
            out.add(getattr(_MODULES[kind], attr))
    return frozenset(out)


def _table(*groups: tuple[str, str]) -> dict[str, frozenset]:
    """{op: its spellings} from (kinds, "op op ...") groups; an op in two groups is a mistake."""
    table: dict[str, frozenset] = {}
    for kinds, names in groups:
        for name in names.split():
            if name in table:
                raise ValueError(f"op {name} is spelled twice")
            table[name] = spellings(name, kinds)
    return table


SPELLINGS = _table(
    # arithmetic and comparisons: Python's operators, torch's functions, the tensor methods
    ("operator torch method", "mul add sub neg pow gt lt ge le eq ne"),
    ("operator=truediv torch method", "div"),
    ("operator torch", "matmul"),
    # pointwise math and activations
    ("torch F method", "tanh sigmoid relu"),
    ("torch method", "exp rsqrt sqrt square abs clamp clip minimum maximum log log1p expm1 sin cos "
                     "reciprocal sign masked_fill"),
    ("torch", "where erf"),
    ("F method", "silu gelu"),
    ("F", "dropout softplus mish relu6 hardtanh leaky_relu elu selu celu hardswish hardsigmoid softsign "
          "logsigmoid layer_norm"),
    ("torch F", "rms_norm"),
    ("method", "clamp_min clamp_max float to type_as contiguous clone half bfloat16"),
    # reductions
    ("torch method", "mean sum var"),
    # moves: views, reshapes and selections of elements
    ("method", "view expand"),
    ("torch method", "reshape transpose t unsqueeze squeeze split chunk unbind narrow"),
    ("torch Tensor method", "flatten unflatten permute"),
    ("operator", "getitem"),
    ("torch", "cat stack view_as_complex view_as_real addmm"),
    # in-place writes into another tensor (a static KV cache's update): sites.written
    ("method", "index_copy_ copy_"),
    ("operator", "setitem"),
)


def ops(*names: str) -> frozenset:
    """Every spelling of the ops named (keys of SPELLINGS)."""
    return frozenset().union(*(SPELLINGS[name] for name in names))


# one value out per position, from the operands' values at that position (with broadcasting);
# dtype casts and copies too: dims labels the output like its operands
ELEMENTWISE = ops(
    "mul", "add", "sub", "div", "neg", "pow", "tanh", "exp", "sigmoid", "rsqrt", "sqrt", "where", "erf",
    "silu", "gelu", "relu", "dropout", "softplus", "mish", "float", "to", "type_as", "contiguous", "clone",
    "half", "bfloat16", "square", "abs", "clamp", "clip", "clamp_min", "clamp_max", "minimum", "maximum",
    "log", "log1p", "expm1", "sin", "cos", "reciprocal", "sign", "masked_fill", "gt", "lt", "ge", "le",
    "eq", "ne", "relu6", "hardtanh", "leaky_relu", "elu", "selu", "celu", "hardswish", "hardsigmoid",
    "softsign", "logsigmoid",
)
LAYER_NORM = ops("layer_norm", "rms_norm")  # over the trailing (anonymous) channels
REDUCE = ops("mean", "sum")  # over the dims named by the call
NORM_PARTS = REDUCE | ops("var", "rsqrt") | LAYER_NORM  # what a norm is made of

RESHAPE = ops("view", "reshape")
UNFLATTEN = ops("unflatten")
FLATTEN = ops("flatten", "unflatten")
PERMUTE = ops("permute")
TRANSPOSE = ops("transpose")
TRANSPOSE_2D = ops("t")
UNSQUEEZE = ops("unsqueeze")
EXPAND = ops("expand")
GETITEM = ops("getitem")
CAT = ops("cat")
STACK = ops("stack")
VIEW_AS_COMPLEX = ops("view_as_complex")
VIEW_AS_REAL = ops("view_as_real")
SHAPE_ARGS = RESHAPE | EXPAND | UNFLATTEN  # ops whose arguments hold sizes
# ops that move or select elements without computing: what may lie between a linear and its parts
MOVES = ops("view", "reshape", "transpose", "permute", "split", "chunk", "unbind", "contiguous", "unflatten",
            "flatten", "narrow", "squeeze", "unsqueeze", "getitem")

ADD = ops("add")
MATMUL = ops("matmul")
ADDMM = ops("addmm")
WRITES = ops("index_copy_", "copy_", "setitem")  # the keys of sites._WRITES
