"""Dimension labels: which dims of each tensor in a block are batch, sequence, heads or channels.

Graphs carry sizes as literals (`view(2, 16, -1, 64)`) or, where Dynamo made a dim dynamic, as
symbol inputs (`view(s0, s1, -1, 64)`). To run a block on a probe (fewer rows and positions) or
with fewer heads/channels, every size argument that means one of those dims must change, and no
other. A size here is an int or, for a dynamic dim, its symbol's expression (see graph.static):
comparing those never adds a guard to Dynamo's shape environment. Labels follow each dim through the block's
ops from the projections' outputs, *by position* (never by matching sizes, which collide: a
sequence of 64 tokens and a head_dim of 64). Each dim is a tuple of atoms (a reshape merges and
splits them); named atoms (b, s, h, kv, c) can be resized, anonymous ones (None) cannot.
An op the rules do not cover raises Unsupported: the site then stays dense, with the reason.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .sites import SDPA, sdpa_qkv, value, written


class Unsupported(Exception):
    pass


@dataclass(frozen=True)
class Atom:
    name: str | None  # b, s, h, kv, c; None: a size that never changes
    size: object  # an int, or a dynamic dim's symbol expression


Dim = tuple[Atom, ...]
Labels = tuple[Dim, ...]

ELEMENTWISE = {
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, operator.pow,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.pow, torch.tanh, torch.exp,
    torch.sigmoid, torch.rsqrt, torch.sqrt, torch.where, torch.erf,
    F.silu, F.gelu, F.relu, F.dropout, F.softplus, F.mish, torch.relu, F.sigmoid, F.tanh,
    "mul", "add", "sub", "div", "neg", "pow", "tanh", "exp", "sigmoid", "rsqrt", "sqrt",
    "float", "to", "type_as", "contiguous", "clone", "half", "bfloat16", "relu", "silu",
    # activations, clamps and comparisons some blocks use: one value per position, like the rest
    torch.square, torch.abs, torch.clamp, torch.clip, torch.minimum, torch.maximum, torch.log, torch.log1p,
    torch.expm1, torch.sin, torch.cos, torch.reciprocal, torch.sign, torch.masked_fill, torch.gt, torch.lt,
    torch.ge, torch.le, torch.eq, torch.ne, operator.gt, operator.lt, operator.ge, operator.le, operator.eq,
    operator.ne, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.hardswish, F.hardsigmoid,
    F.softsign, F.logsigmoid, "square", "abs", "clamp", "clip", "clamp_min", "clamp_max", "minimum",
    "maximum", "log", "log1p", "expm1", "sin", "cos", "reciprocal", "sign", "masked_fill", "gt", "lt", "ge",
    "le", "eq", "ne", "gelu",
}
RESHAPE = {"view", "reshape", torch.reshape}
FLATTEN = {"flatten", "unflatten", torch.flatten, torch.unflatten, torch.Tensor.flatten, torch.Tensor.unflatten}
UNFLATTEN = {"unflatten", torch.unflatten, torch.Tensor.unflatten}
PERMUTE = {"permute", torch.permute, torch.Tensor.permute}
SHAPE_ARGS = RESHAPE | {"expand"} | UNFLATTEN  # ops whose arguments hold sizes
REDUCE = {"mean", "sum", torch.mean, torch.sum}


def size_of(dim: Dim):
    return math.prod(a.size for a in dim)


def _shape(v) -> tuple:
    from .graph import static  # graph imports this module
    return tuple(static(s) for s in v.shape)


def anon(n: int) -> Dim:
    return () if n == 1 else (Atom(None, n),)


class Labeler:
    """Label every node of `region` derived from the `start` nodes."""

    def __init__(self, start: dict[fx.Node, Labels]):
        self.labels: dict[fx.Node, Labels] = dict(start)
        # the block's sequence atom: a cache sliced to exactly its length holds the block's tokens
        self.seq = next((a for lab in start.values() for d in lab for a in d if a.name == "s"), None)
        # side inputs that must be gathered: (node, arg position or kwarg name) -> {dim: atom name}
        self.side: dict[tuple[fx.Node, int | str], dict[int, str]] = {}
        # of those with sequence dims, the side's dim that lines up with the op's batch dim, even
        # where the side broadcasts over it (size 1; negative: the side lacks it): a probe whose
        # sequences each have positions of their own gathers the side per sequence (ops.side_at)
        self.side_batch: dict[tuple[fx.Node, int | str], int] = {}

    def run(self, region: list[fx.Node]) -> "Labeler":
        for n in region:
            if n in self.labels or not any(a in self.labels for a in n.all_input_nodes):
                continue
            if value(n) is None and n.op == "call_method" and n.target == "size":
                continue  # a dynamic size read off a tensor: an int, not a tensor to label
            self.labels[n] = self._rule(n)
        return self

    # ---- rules ----
    def _rule(self, n: fx.Node) -> Labels:
        t = n.target
        if written(n) is not None:
            return self._write(n)
        if n.op == "call_method" and t in RESHAPE or t is torch.reshape or t in FLATTEN:
            return self._reshape(n)  # read from the output's shape
        if t == "transpose" or t is torch.transpose:
            lab = list(self._in(n))
            i, j = (d % len(lab) for d in n.args[1:3])
            lab[i], lab[j] = lab[j], lab[i]
            return tuple(lab)
        if t in PERMUTE:
            order = n.args[1] if isinstance(n.args[1], (tuple, list)) else n.args[1:]
            lab = self._in(n)
            return tuple(lab[d] for d in order)
        if t == "unsqueeze" or t is torch.unsqueeze:
            lab = list(self._in(n))
            d = n.args[1] % (len(lab) + 1)
            return tuple(lab[:d] + [()] + lab[d:])
        if t == "expand":
            return self._expand(n)
        if t is operator.getitem:
            return self._getitem(n)
        if t in REDUCE:
            return self._reduce(n)
        if t in SDPA:
            return self._sdpa(n)
        if t is torch.cat:
            return self._cat(n)
        if t is torch.stack:
            return self._stack(n)
        if t is torch.view_as_complex:  # (..., d/2, 2) real -> (..., d/2) complex (LLaMA-4's rotary)
            lab = self._in(n)
            self._fixed(lab[-1], n)
            return lab[:-1]
        if t is torch.view_as_real:
            return self._in(n) + (anon(2),)
        if t in ELEMENTWISE or t is F.layer_norm:
            return self._broadcast(n)
        raise Unsupported(f"op {getattr(t, '__name__', t)!s} ({n.name}) has no dimension rule")

    def _in(self, n: fx.Node) -> Labels:
        return self.labels[n.args[0]]

    def _out_shape(self, n: fx.Node) -> tuple:
        v = value(n)
        if v is None:
            raise Unsupported(f"{n.name} has no shape")
        return _shape(v)

    def _reshape(self, n: fx.Node) -> Labels:
        atoms = [a for d in self._in(n) for a in d]
        out, i = [], 0
        for size in self._out_shape(n):
            dim, prod = [], 1
            if size == 1 and i < len(atoms) and atoms[i].size == 1:  # a size-1 dim keeps its label
                out.append((atoms[i],))
                i += 1
                continue
            while i < len(atoms) and prod != size and _may_grow(prod, size):
                dim.append(atoms[i])
                prod *= atoms[i].size
                i += 1
            if prod != size:
                if len(dim) == 1 and dim[0].name is None and isinstance(prod, int) and isinstance(size, int) \
                        and prod % size == 0:  # splitting an anonymous size: fine
                    atoms.insert(i, Atom(None, prod // size))
                    dim = [Atom(None, size)]
                else:
                    raise Unsupported(f"{n.name}: reshape splits a batch/sequence/head dimension")
            out.append(tuple(dim))
        if any(a.size != 1 for a in atoms[i:]):
            raise Unsupported(f"{n.name}: reshape does not line up")
        # anonymous atoms merged are one anonymous size (a flatten(-2) meets a slice of 8 as an equal)
        return tuple(anon(size_of(d)) if len(d) > 1 and not any(a.name for a in d) and isinstance(size_of(d), int)
                     else d for d in out)

    def _expand(self, n: fx.Node) -> Labels:
        lab = self._in(n)
        shape = self._out_shape(n)
        pad = len(shape) - len(lab)
        out = []
        for i, size in enumerate(shape):
            j = i - pad
            if j >= 0 and size_of(lab[j]) == size:
                out.append(lab[j])
            elif j < 0 or lab[j] == ():
                out.append(anon(size))
            else:
                raise Unsupported(f"{n.name}: expand of a labelled dimension")
        return tuple(out)

    def _getitem(self, n: fx.Node) -> Labels:
        lab = list(self._in(n))
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in idx):
            raise Unsupported(f"{n.name}: indexing with tensors")
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out, d = [], 0
        for i in idx:
            if i is Ellipsis:
                out.extend(lab[d:d + len(lab) - n_real])
                d += len(lab) - n_real
            elif i is None:
                out.append(())
            elif isinstance(i, int):
                self._fixed(lab[d], n)
                d += 1
            elif isinstance(i, slice):
                if i == slice(None):
                    out.append(lab[d])
                elif self._cache_prefix(lab[d], i, n, len(out)):
                    out.append((self.seq,))  # an empty cache's first L positions: this call's tokens
                else:
                    self._fixed(lab[d], n)
                    out.append(None)  # filled from the shape below
                d += 1
        out.extend(lab[d:])
        shape = self._out_shape(n)
        return tuple(anon(shape[k]) if dim is None else dim for k, dim in enumerate(out))

    def _cache_prefix(self, dim: Dim, i: slice, n: fx.Node, k: int) -> bool:
        """cache[..., :L, ...]: a cache's positions cut to the block's sequence length (what a
        prefill into an empty static cache attends to)."""
        if self.seq is None or len(dim) != 1 or dim[0].name != "s" or i.start not in (None, 0) or i.step is not None:
            return False
        return self._out_shape(n)[k] == self.seq.size

    def _reduce(self, n: fx.Node) -> Labels:
        lab = list(self._in(n))
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dims is None:
            raise Unsupported(f"{n.name}: full reduction")
        dims = [d % len(lab) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        for d in dims:
            self._fixed(lab[d], n)
        keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        return tuple(() if i in dims else x for i, x in enumerate(lab) if keep or i not in dims)

    def _sdpa(self, n: fx.Node) -> Labels:
        q, k, v = sdpa_qkv(n)
        lq = self.labels.get(q)
        lk, lv = self.labels.get(k), self.labels.get(v)
        if lq is None or lk is None or lv is None or len(lq) != 4:
            raise Unsupported(f"{n.name}: attention inputs are not all derived from the block input")
        mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
        if isinstance(mask, fx.Node) and mask not in self.labels:
            shape = _shape(value(mask))
            need = {}
            for dim, ref in zip(range(len(shape) - 4, len(shape)), (lq[0], lq[1], lq[2], lk[2])):
                if dim >= 0 and shape[dim] != 1 and ref:
                    need[dim] = self._atom_name(ref, n)
            key = "attn_mask" if "attn_mask" in n.kwargs else 3
            self.side[(n, key)] = {d: a for d, a in need.items() if a}
            self._batch_dim_of(n, key, len(shape) - 4, lq[0])
        return lq[:-1] + (lv[-1],)

    def _write(self, n: fx.Node) -> Labels:
        """A static cache's update, cache.index_copy_(dim, positions, x): the cache has x's dims but
        for the written one, which is as long as the cache (its positions keep their label, so that
        a probe reads its own keys and the mask's key columns at its positions)."""
        if n.target != "index_copy_":
            raise Unsupported(f"{n.name}: writes into a cache with {n.target} (no dimension rule)")
        src, target = written(n), n.args[0]
        lab = self.labels.get(src)
        if lab is None:
            raise Unsupported(f"{n.name}: writes a tensor not derived from the block input into a cache")
        dim = n.args[1] % len(lab)
        length = _shape(value(target))[dim]
        names = [a.name for a in lab[dim] if a.name]
        if len(lab[dim]) > 1:
            raise Unsupported(f"{n.name}: the cache's positions are merged with another dimension")
        out = tuple((Atom(names[0], length),) if i == dim and names else anon(length) if i == dim else d
                    for i, d in enumerate(lab))
        self.labels[target] = out
        return out

    def _cat(self, n: fx.Node) -> Labels:
        # an empty side operand (a fresh KV cache: cat([tensor([]), k])) changes nothing
        tensors = [t for t in n.args[0] if t in self.labels or value(t) is None or math.prod(_shape(value(t))) != 0]
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        labs = [self.labels.get(t) for t in tensors]
        if len(labs) == 1 and labs[0] is not None:
            return labs[0]
        if any(lab is None for lab in labs):
            raise Unsupported(f"{n.name}: cat of a tensor not derived from the block input")
        dim %= len(labs[0])
        for lab in labs:
            self._fixed(lab[dim], n)
        return tuple(anon(self._out_shape(n)[dim]) if i == dim else x for i, x in enumerate(labs[0]))

    def _stack(self, n: fx.Node) -> Labels:
        """torch.stack of tensors laid out alike (GPT-J's rotate_every_two: stack((-x2, x1), -1)):
        their dims, and a new anonymous one."""
        labs = [self.labels.get(t) for t in n.args[0]]
        if any(lab is None for lab in labs) or len(set(labs)) != 1:
            raise Unsupported(f"{n.name}: stack of tensors laid out differently")
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) % (len(labs[0]) + 1)
        return labs[0][:dim] + (anon(len(labs)),) + labs[0][dim:]

    def _broadcast(self, n: fx.Node) -> Labels:
        shape = self._out_shape(n)
        out: list[Dim | None] = [None] * len(shape)
        sides = []
        for key, a in list(enumerate(n.args)) + list(n.kwargs.items()):
            if not isinstance(a, fx.Node) or value(a) is None:
                continue
            if a not in self.labels:
                sides.append((key, a))
                continue
            lab = self.labels[a]
            for j, dim in enumerate(lab):
                k = j + len(shape) - len(lab)
                if size_of(dim) == shape[k]:
                    if out[k] is not None and out[k] != dim and dim and out[k]:
                        raise Unsupported(f"{n.name}: operands disagree on a dimension")
                    out[k] = dim if dim or out[k] is None else out[k]
        labels = tuple(anon(shape[k]) if d is None else d for k, d in enumerate(out))
        for key, a in sides:
            side_shape = _shape(value(a))
            need = {}
            for j, size in enumerate(side_shape):
                k = j + len(shape) - len(side_shape)
                if size != 1 and labels[k]:
                    name = self._atom_name(labels[k], n)
                    if name:
                        need[j] = name
            if need:
                self.side[(n, key)] = need
            batch = [k for k, d in enumerate(labels) if any(a.name == "b" for a in d)]
            if batch:
                self._batch_dim_of(n, key, batch[0] - (len(shape) - len(side_shape)), labels[batch[0]])
        return labels

    def _batch_dim_of(self, n: fx.Node, key, dim: int, ref: Dim) -> None:
        """Record the side's dim `dim` (relative to the side) as lined up with the op's batch dim
        `ref`, for a side that has sequence dims."""
        if "s" in self.side.get((n, key), {}).values() and [a.name for a in ref] == ["b"]:
            self.side_batch[(n, key)] = dim

    @staticmethod
    def _atom_name(dim: Dim, n: fx.Node) -> str | None:
        named = [a.name for a in dim if a.name]
        if len(dim) > 1 and named:
            raise Unsupported(f"{n.name}: a side input spans merged batch/sequence/head dims")
        return named[0] if named else None

    @staticmethod
    def _fixed(dim: Dim, n: fx.Node) -> None:
        if any(a.name for a in dim):
            raise Unsupported(f"{n.name}: slices or reduces a batch/sequence/head dimension")


def _may_grow(prod, size) -> bool:
    """Whether a reshape's output dim may take one more input atom: while the product is below
    the size (ints), or, with a dynamic size on either side, until the two are the same."""
    return prod < size if isinstance(prod, int) and isinstance(size, int) else True


def check_resizable(n: fx.Node, labels: Labels, names: set[str]) -> None:
    """Raise Unsupported now if resizing the atoms `names` would later need the size of a dynamic
    atom merged into the same argument (which the graph has no node for)."""
    if n.target not in SHAPE_ARGS:
        return
    for dim in labels:
        if any(a.name in names for a in dim) and \
                any(a.name not in names and not isinstance(a.size, int) for a in dim):
            raise Unsupported(f"{n.name}: a resized dimension is merged with a dynamic one")


def resized_args(n: fx.Node, labels: Labels, new: dict):
    """Arguments of a shape op (view/reshape/expand) with every size that holds a resized atom
    (a name in `new`: to an int or a node) rebuilt; the others stay as they were (literals or
    symbol inputs). New product nodes go at the graph's current insertion point."""
    from .graph import mul  # graph imports this module
    if n.target not in SHAPE_ARGS:
        return n.args
    if n.target in UNFLATTEN:  # (x, dim, sizes): the sizes are the output's dims from dim on
        dim, shape_args = n.args[1], n.args[2]
        first = dim % (len(labels) - len(shape_args) + 1)
        labels = labels[first:first + len(shape_args)]
    else:
        shape_args = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
    sizes = []
    for i, a in enumerate(shape_args):
        if a == -1 and isinstance(a, int) or not any(atom.name in new for atom in labels[i]):
            sizes.append(a)
            continue
        size = 1
        for atom in labels[i]:
            factor = new.get(atom.name, atom.size) if atom.name else atom.size
            if not isinstance(factor, (int, fx.Node)):
                raise Unsupported(f"{n.name}: a resized dimension is merged with a dynamic one")
            size = mul(n.graph, size, factor, name=f"{n.name}_size") if size != 1 else factor
        sizes.append(size)
    return (n.args[0], n.args[1], tuple(sizes)) if n.target in UNFLATTEN else (n.args[0], tuple(sizes))
