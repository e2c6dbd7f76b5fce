"""Dimension labels: which dims of each tensor in a block are batch, sequence, heads or channels.

Graphs carry sizes as literals (`view(2, 16, -1, 64)`) or, where Dynamo made a dim dynamic, as
symbol inputs (`view(s0, s1, -1, 64)`). To run a block on a probe (fewer rows and positions) or
with fewer heads/channels, every size argument that means one of those dims must change, and no
other. A size here is an int or, for a dynamic dim, its symbol's expression (see graph.static):
comparing those never adds a guard to Dynamo's shape environment. Labels follow each dim through the block's
ops from the projections' outputs, *by position* (never by matching sizes, which collide: a
sequence of 64 tokens and a head_dim of 64). Each dim is a tuple of atoms (a reshape merges and
splits them); named atoms (b, s, h, kv, c) can be resized, anonymous ones (None) cannot.
Each op's rule is one function, registered with @dim_rule for the op's spellings (opsets.py);
the Labeler looks a node's target up in RULES. An op no rule covers raises Unsupported: the site
then stays dense, with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from . import opsets
from .graph import Unsupported, mul, shape_of, static  # Unsupported: importers read it from here too
from .sites import SDPA, sdpa_qkv, value, written


@dataclass(frozen=True)
class Atom:
    name: str | None  # b, s, h, kv, c; None: a size that never changes
    size: object  # an int, or a dynamic dim's symbol expression


Dim = tuple[Atom, ...]
Labels = tuple[Dim, ...]
Rule = Callable[["Labeler", fx.Node], Labels]
RULES: dict[object, Rule] = {}  # an op's spelling (a node's target) -> its dimension rule


def dim_rule(*ops) -> Callable[[Rule], Rule]:
    """Register the decorated function as the dimension rule of `ops`: op sets (opsets.py) or
    single spellings. A spelling has one rule (a second raises): no rule shadows another."""
    targets = set().union(*(op if isinstance(op, (set, frozenset)) else {op} for op in ops))

    def register(rule: Rule) -> Rule:
        taken = [t for t in targets if t in RULES]
        if taken:
            raise ValueError(f"{rule.__name__}: {taken[0]!r} already has the rule {RULES[taken[0]].__name__}")
        RULES.update(dict.fromkeys(targets, rule))
        return rule
    return register


def no_rule(n: fx.Node) -> Unsupported:
    t = n.target
    return Unsupported(f"op {getattr(t, '__name__', t)!s} ({n.name}) has no dimension rule")


def size_of(dim: Dim):
    return math.prod(a.size for a in dim)


def _shape(v) -> tuple:
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

    def _rule(self, n: fx.Node) -> Labels:
        rule = RULES.get(n.target)
        if rule is None:
            raise no_rule(n)
        return rule(self, n)

    def input_labels(self, n: fx.Node) -> Labels:
        """The labels of `n`'s first argument (the tensor a unary op reads)."""
        return self.labels[n.args[0]]


# ---- rules: one per op set, each (labeler, node) -> the node's labels ----

@dim_rule(opsets.WRITES)
def write(labeler: Labeler, n: fx.Node) -> Labels:
    """A static cache's update, cache.index_copy_(dim, positions, x): the cache has x's dims but
    for the written one, which is as long as the cache (its positions keep their label, so that
    a probe reads its own keys and the mask's key columns at its positions)."""
    if written(n) is None:  # too few arguments to write anything: no op this rule knows
        raise no_rule(n)
    if n.target != "index_copy_":
        raise Unsupported(f"{n.name}: writes into a cache with {n.target} (no dimension rule)")
    src, target = written(n), n.args[0]
    lab = labeler.labels.get(src)
    if lab is None:
        raise Unsupported(f"{n.name}: writes a tensor not derived from the block input into a cache")
    dim = n.args[1] % len(lab)
    length = _shape(value(target))[dim]
    names = [a.name for a in lab[dim] if a.name]
    if len(lab[dim]) > 1:
        raise Unsupported(f"{n.name}: the cache's positions are merged with another dimension")
    out = tuple((Atom(names[0], length),) if i == dim and names else anon(length) if i == dim else d
                for i, d in enumerate(lab))
    labeler.labels[target] = out
    return out


@dim_rule(opsets.RESHAPE, opsets.FLATTEN)
def reshape(labeler: Labeler, n: fx.Node) -> Labels:
    """view/reshape/flatten/unflatten: the output's dims, read off its shape, take the input's
    atoms in order (merging them, or splitting an anonymous one)."""
    if n.op != "call_method" and isinstance(n.target, str) and n.target in opsets.RESHAPE:
        raise no_rule(n)  # "view"/"reshape" as a call_module's target: a submodule, not the method
    atoms = [a for d in labeler.input_labels(n) for a in d]
    out, i = [], 0
    for size in shape_of(n):
        if size == 1 and i < len(atoms) and atoms[i].size == 1:  # a size-1 dim keeps its label
            out.append((atoms[i],))
            i += 1
            continue
        dim, i = _take_atoms(atoms, i, size, n)
        out.append(dim)
    if any(a.size != 1 for a in atoms[i:]):
        raise Unsupported(f"{n.name}: reshape does not line up")
    # anonymous atoms merged are one anonymous size (a flatten(-2) meets a slice of 8 as an equal)
    return tuple(anon(size_of(d)) if len(d) > 1 and not any(a.name for a in d) and isinstance(size_of(d), int)
                 else d for d in out)


def _take_atoms(atoms: list[Atom], i: int, size, n: fx.Node) -> tuple[Dim, int]:
    """The input atoms from `i` on that make one output dim of `size`, and the index after them.
    An anonymous atom larger than `size` is split in `atoms` (its rest goes on to the next dim)."""
    dim, prod = [], 1
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
    return tuple(dim), i


def _may_grow(prod, size) -> bool:
    """Whether a reshape's output dim may take one more input atom: while the product is below
    the size (ints), or, with a dynamic size on either side, until the two are the same."""
    return prod < size if isinstance(prod, int) and isinstance(size, int) else True


@dim_rule(opsets.TRANSPOSE)
def transpose(labeler: Labeler, n: fx.Node) -> Labels:
    """transpose(x, i, j): dims i and j swap."""
    lab = list(labeler.input_labels(n))
    i, j = (d % len(lab) for d in n.args[1:3])
    lab[i], lab[j] = lab[j], lab[i]
    return tuple(lab)


@dim_rule(opsets.PERMUTE)
def permute(labeler: Labeler, n: fx.Node) -> Labels:
    """permute(x, order) or x.permute(*order): the input's dims in that order."""
    order = n.args[1] if isinstance(n.args[1], (tuple, list)) else n.args[1:]
    lab = labeler.input_labels(n)
    return tuple(lab[d] for d in order)


@dim_rule(opsets.UNSQUEEZE)
def unsqueeze(labeler: Labeler, n: fx.Node) -> Labels:
    """unsqueeze(x, d): a new dim of size 1 (no atoms) at d."""
    lab = list(labeler.input_labels(n))
    d = n.args[1] % (len(lab) + 1)
    return tuple(lab[:d] + [()] + lab[d:])


@dim_rule(opsets.EXPAND)
def expand(labeler: Labeler, n: fx.Node) -> Labels:
    """x.expand(*sizes): dims kept keep their labels; new or size-1 dims grown are anonymous."""
    lab = labeler.input_labels(n)
    shape = shape_of(n)
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


@dim_rule(opsets.GETITEM)
def getitem(labeler: Labeler, n: fx.Node) -> Labels:
    """x[idx] with ints, slices, None and Ellipsis: a labelled dim may only be taken whole, or,
    for a cache's positions, cut to the block's sequence (see _cache_prefix)."""
    lab = list(labeler.input_labels(n))
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
            _fixed(lab[d], n)
            d += 1
        elif isinstance(i, slice):
            if i == slice(None):
                out.append(lab[d])
            elif _cache_prefix(labeler, lab[d], i, n, len(out)):
                out.append((labeler.seq,))  # an empty cache's first L positions: this call's tokens
            else:
                _fixed(lab[d], n)
                out.append(None)  # filled from the shape below
            d += 1
    out.extend(lab[d:])
    shape = shape_of(n)
    return tuple(anon(shape[k]) if dim is None else dim for k, dim in enumerate(out))


def _cache_prefix(labeler: Labeler, dim: Dim, i: slice, n: fx.Node, k: int) -> bool:
    """cache[..., :L, ...]: a cache's positions cut to the block's sequence length (what a
    prefill into an empty static cache attends to)."""
    seq = labeler.seq
    if seq is None or len(dim) != 1 or dim[0].name != "s" or i.start not in (None, 0) or i.step is not None:
        return False
    return shape_of(n)[k] == seq.size


@dim_rule(opsets.REDUCE)
def reduce(labeler: Labeler, n: fx.Node) -> Labels:
    """mean/sum over named dims (keepdim or not): the reduced dims must be anonymous."""
    lab = list(labeler.input_labels(n))
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        raise Unsupported(f"{n.name}: full reduction")
    dims = [d % len(lab) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    for d in dims:
        _fixed(lab[d], n)
    keep = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
    return tuple(() if i in dims else x for i, x in enumerate(lab) if keep or i not in dims)


@dim_rule(SDPA)
def sdpa(labeler: Labeler, n: fx.Node) -> Labels:
    """Attention: q's dims with v's last; a mask from outside the block is a side input, its last
    four dims lined up with (batch, heads, queries, keys)."""
    q, k, v = sdpa_qkv(n)
    lq = labeler.labels.get(q)
    lk, lv = labeler.labels.get(k), labeler.labels.get(v)
    if lq is None or lk is None or lv is None or len(lq) != 4:
        raise Unsupported(f"{n.name}: attention inputs are not all derived from the block input")
    mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
    if isinstance(mask, fx.Node) and mask not in labeler.labels:
        shape = _shape(value(mask))
        need = {}
        for dim, ref in zip(range(len(shape) - 4, len(shape)), (lq[0], lq[1], lq[2], lk[2])):
            if dim >= 0 and shape[dim] != 1 and ref:
                need[dim] = _atom_name(ref, n)
        key = "attn_mask" if "attn_mask" in n.kwargs else 3
        labeler.side[(n, key)] = {d: a for d, a in need.items() if a}
        _batch_dim_of(labeler, n, key, len(shape) - 4, lq[0])
    return lq[:-1] + (lv[-1],)


@dim_rule(opsets.CAT)
def cat(labeler: Labeler, n: fx.Node) -> Labels:
    """torch.cat: the operands' dims, the joined one anonymous (it must be anonymous in each)."""
    # an empty side operand (a fresh KV cache: cat([tensor([]), k])) changes nothing
    tensors = [t for t in n.args[0]
               if t in labeler.labels or value(t) is None or math.prod(_shape(value(t))) != 0]
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    labs = [labeler.labels.get(t) for t in tensors]
    if len(labs) == 1 and labs[0] is not None:
        return labs[0]
    if any(lab is None for lab in labs):
        raise Unsupported(f"{n.name}: cat of a tensor not derived from the block input")
    dim %= len(labs[0])
    for lab in labs:
        _fixed(lab[dim], n)
    return tuple(anon(shape_of(n)[dim]) if i == dim else x for i, x in enumerate(labs[0]))


@dim_rule(opsets.STACK)
def stack(labeler: Labeler, n: fx.Node) -> Labels:
    """torch.stack of tensors laid out alike (GPT-J's rotate_every_two: stack((-x2, x1), -1)):
    their dims, and a new anonymous one."""
    labs = [labeler.labels.get(t) for t in n.args[0]]
    if any(lab is None for lab in labs) or len(set(labs)) != 1:
        raise Unsupported(f"{n.name}: stack of tensors laid out differently")
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0) % (len(labs[0]) + 1)
    return labs[0][:dim] + (anon(len(labs)),) + labs[0][dim:]


@dim_rule(opsets.VIEW_AS_COMPLEX)
def view_as_complex(labeler: Labeler, n: fx.Node) -> Labels:
    """(..., d/2, 2) real -> (..., d/2) complex (LLaMA-4's rotary): the pair dim must be anonymous."""
    lab = labeler.input_labels(n)
    _fixed(lab[-1], n)
    return lab[:-1]


@dim_rule(opsets.VIEW_AS_REAL)
def view_as_real(labeler: Labeler, n: fx.Node) -> Labels:
    """(...) complex -> (..., 2) real: a new anonymous pair dim."""
    return labeler.input_labels(n) + (anon(2),)


@dim_rule(opsets.ELEMENTWISE, opsets.LAYER_NORM)
def broadcast(labeler: Labeler, n: fx.Node) -> Labels:
    """An elementwise op (and layer_norm or rms_norm, over anonymous channels): each output dim takes the label
    of the labelled operands' dim it lines up with (broadcasting from the right). An operand from
    outside the block is a side input: its dims that line up with named ones must be gathered."""
    shape = shape_of(n)
    operands = [(key, a) for key, a in list(enumerate(n.args)) + list(n.kwargs.items())
                if isinstance(a, fx.Node) and value(a) is not None]
    labels = _lined_up(labeler, n, shape, [a for _, a in operands if a in labeler.labels])
    for key, a in operands:
        if a not in labeler.labels:
            _side_input(labeler, n, key, _shape(value(a)), labels)
    return labels


def _lined_up(labeler: Labeler, n: fx.Node, shape: tuple, tensors: list[fx.Node]) -> Labels:
    """The output's labels from its labelled operands: a dim of equal size lends its label
    (a named one over an empty one); two different named labels on one dim raise."""
    out: list[Dim | None] = [None] * len(shape)
    for a in tensors:
        lab = labeler.labels[a]
        for j, dim in enumerate(lab):
            k = j + len(shape) - len(lab)
            if size_of(dim) == shape[k]:
                if out[k] is not None and out[k] != dim and dim and out[k]:
                    raise Unsupported(f"{n.name}: operands disagree on a dimension")
                out[k] = dim if dim or out[k] is None else out[k]
    return tuple(anon(shape[k]) if d is None else d for k, d in enumerate(out))


def _side_input(labeler: Labeler, n: fx.Node, key, side_shape: tuple, labels: Labels) -> None:
    """Record which dims of the side input at `key` (shape `side_shape`) must be gathered: those
    not broadcast (size != 1) under a named output dim; and where it lines up with the batch."""
    shape_len = len(labels)
    need = {}
    for j, size in enumerate(side_shape):
        k = j + shape_len - len(side_shape)
        if size != 1 and labels[k]:
            name = _atom_name(labels[k], n)
            if name:
                need[j] = name
    if need:
        labeler.side[(n, key)] = need
    batch = [k for k, d in enumerate(labels) if any(a.name == "b" for a in d)]
    if batch:
        _batch_dim_of(labeler, n, key, batch[0] - (shape_len - len(side_shape)), labels[batch[0]])


# ---- helpers the rules share ----

def _batch_dim_of(labeler: Labeler, n: fx.Node, key, dim: int, ref: Dim) -> None:
    """Record the side's dim `dim` (relative to the side) as lined up with the op's batch dim
    `ref`, for a side that has sequence dims."""
    if "s" in labeler.side.get((n, key), {}).values() and [a.name for a in ref] == ["b"]:
        labeler.side_batch[(n, key)] = dim


def _atom_name(dim: Dim, n: fx.Node) -> str | None:
    named = [a.name for a in dim if a.name]
    if len(dim) > 1 and named:
        raise Unsupported(f"{n.name}: a side input spans merged batch/sequence/head dims")
    return named[0] if named else None


def _fixed(dim: Dim, n: fx.Node) -> None:
    """A dim an op slices, indexes or reduces: it must carry no named atom."""
    if any(a.name for a in dim):
        raise Unsupported(f"{n.name}: slices or reduces a batch/sequence/head dimension")


# ---- resizing a shape op's arguments ----

def check_resizable(n: fx.Node, labels: Labels, names: set[str]) -> None:
    """Raise Unsupported now if resizing the atoms `names` would later need the size of a dynamic
    atom merged into the same argument (which the graph has no node for)."""
    if n.target not in opsets.SHAPE_ARGS:
        return
    for dim in labels:
        if any(a.name in names for a in dim) and \
                any(a.name not in names and not isinstance(a.size, int) for a in dim):
            raise Unsupported(f"{n.name}: a resized dimension is merged with a dynamic one")


def resized_args(n: fx.Node, labels: Labels, new: dict):
    """Arguments of a shape op (view/reshape/expand) with every size that holds a resized atom
    (a name in `new`: to an int or a node) rebuilt; the others stay as they were (literals or
    symbol inputs). New product nodes go at the graph's current insertion point."""
    if n.target not in opsets.SHAPE_ARGS:
        return n.args
    if n.target in opsets.UNFLATTEN:  # (x, dim, sizes): the sizes are the output's dims from dim on
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
    return (n.args[0], n.args[1], tuple(sizes)) if n.target in opsets.UNFLATTEN else (n.args[0], tuple(sizes))
