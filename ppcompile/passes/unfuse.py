"""Bring every projection to one form before blocks are found: `F.linear`, one per role.

Two rewrites, each value-preserving and each checked before any node changes:

- **Linear forms** (`normalize_linears`). A projection is also written as GPT-2's Conv1D,
  `addmm(b, x.view(-1, d), W)` with W stored (d, out), or as Falcon's `x @ W.T (+ b)`. Both become
  `F.linear(x, W', b)` on the same weight (`W.t()`, a view, where it is stored transposed): the
  layout is read from the op, never from a class name.
- **Fused projections** (`split_fused`). One linear whose output is cut into parts that the block
  uses apart (q | k | v, gate | up; by `split`, `chunk`, `unbind`, a slice or an index, after any
  views and transposes) becomes one linear per part, on the part's rows of the fused weight.
  Which rows, and how each part's layout follows from a plain linear's output, is read by running
  the ops between the linear and the part on index tensors (each output position's column, batch
  and sequence index), and the rewrite is made only where the new part gives every position the
  same column, batch and sequence index as the old one.

Weights stay where they are: a part's weight is a slice (a view) of the fused one, or its rows
gathered where the part's rows are not contiguous (GPT-NeoX interleaves q, k, v per head). Nodes
made here from weights alone carry meta["pp_weight"], so that real_tensors can compute them.
"""
from __future__ import annotations

import builtins
import operator

import torch
import torch.nn.functional as F
from torch import fx

from . import opsets
from .graph import body_start, call, hint, refresh_values, static
from .sites import Site, find_sites, is_linear, value
from .status import Dense, Reason

WEIGHT_VIEW = "pp_weight"  # meta key: a node computed from weights alone (see real_tensors)


def prepare(gm: fx.GraphModule) -> tuple[list[Site], list[str], int]:
    """Normalize the linears of `gm` in place, split the fused projections of blocks that need it
    (an attention whose q/k/v are not three linears, an MLP with one first projection), and find
    the sites. A split part may itself be fused (GPT-BigCode: q | kv, then k | v): up to 3 rounds."""
    changed = normalize_linears(gm)
    for round_ in range(4):
        if changed:
            _refresh(gm)
        sites, problems, n_layers = find_sites(gm)
        if round_ == 3:
            break
        changed = sum(split_fused(gm, p) for s in sites if _may_be_fused(s) for p in s.projections)
        if not changed:
            break
    return sites, problems, n_layers


def _refresh(gm: fx.GraphModule) -> None:
    """Recompile a rewritten graph and record its nodes' values (find_sites reads shapes)."""
    gm.graph.lint()
    gm.recompile()
    refresh_values(gm)


def _may_be_fused(site: Site) -> bool:
    if site.kind == "attention":
        return site.status == Dense(Reason.QKV_UNKNOWN)
    return len(site.projections) == 1


# ---- linear forms ----

def is_weight(node) -> bool:
    """A parameter of the model: a graph input Dynamo made from one, or a constant of the module."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    example = getattr(node.meta.get("grapharg"), "example", None)
    return isinstance(example, torch.nn.Parameter) or "parameters" in node.name


def _weight(node, dims: int):
    """`node` if it is a weight with `dims` dims (the tensor itself), else None."""
    v = value(node) if isinstance(node, fx.Node) else None
    return node if is_weight(node) and v is not None and v.dim() == dims else None


def normalize_linears(gm: fx.GraphModule) -> int:
    """Rewrite Conv1D's addmm and `x @ W.T (+ b)` into F.linear in place; the number rewritten."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in opsets.ADDMM:
            done += _conv1d(gm.graph, node)
        elif node.target in opsets.MATMUL:
            done += _matmul(gm.graph, node)
    return done


def _conv1d(g: fx.Graph, node: fx.Node) -> bool:
    """addmm(b, x.view(-1, d), W) with W (d, out), read back by views: linear(x, W.t(), b), on x as
    it was (the views after it reshape a contiguous tensor of the same elements)."""
    if len(node.args) != 3 or node.kwargs:
        return False
    bias, flat, w = node.args
    if _weight(w, 2) is None or _weight(bias, 1) is None or not isinstance(flat, fx.Node):
        return False
    if flat.op != "call_method" or flat.target not in opsets.RESHAPE or not node.users or \
            any(u.op != "call_method" or u.target not in opsets.RESHAPE for u in node.users):
        return False
    x = flat.args[0]
    xv = value(x)
    if xv is None or xv.dim() < 2 or xv.shape[-1] != value(w).shape[0]:
        return False
    w_t = _weight_op(g, torch.Tensor.t, w, name=f"{w.name}_t")
    with g.inserting_before(node):
        linear = call(g, F.linear, x, w_t, bias, name=node.name)
    want = tuple(static(s) for s in xv.shape[:-1]) + (static(value(w).shape[1]),)
    for view in list(node.users):  # the view back to x's lead dims: what the linear gives now
        v = value(view)
        if v is not None and tuple(static(s) for s in v.shape) == want:
            view.replace_all_uses_with(node)
            g.erase_node(view)
    _replace(g, node, linear)
    if not flat.users:
        g.erase_node(flat)
    return True


def _matmul(g: fx.Graph, node: fx.Node) -> bool:
    """x @ W.T (W stored (out, in)) or x @ W (stored (in, out)), and a bias added right after:
    linear(x, W or W.t(), b)."""
    x, rhs = node.args[:2] if len(node.args) >= 2 else (None, None)
    if not isinstance(x, fx.Node) or not isinstance(rhs, fx.Node) or is_weight(x) or node.kwargs:
        return False
    if _weight(rhs, 2) is not None:
        w, transposed = rhs, True  # x @ W: W is (in, out)
    elif _transposed_weight(rhs) is not None:
        w, transposed = _transposed_weight(rhs), False
    else:
        return False
    bias, out = None, node
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in opsets.ADD \
            and len(users[0].args) == 2 and not users[0].kwargs:
        other = next(a for a in users[0].args if a is not node) if node in users[0].args else None
        if _weight(other, 1) is not None:
            bias, out = other, users[0]
    if transposed:
        w = _weight_op(g, torch.Tensor.t, w, name=f"{w.name}_t")
    with g.inserting_before(node):
        linear = call(g, F.linear, x, w, bias, name=node.name)
    _replace(g, out, linear, meta_from=node)
    if out is not node:
        g.erase_node(node)
    if rhs.op == "call_function" and not rhs.users:
        g.erase_node(rhs)
    return True


def _transposed_weight(node: fx.Node) -> fx.Node | None:
    """W for W.T, W.t(), W.transpose(0, 1) of a 2-d weight W."""
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1:] == ("T",):
        return _weight(node.args[0], 2)
    if node.target in opsets.TRANSPOSE_2D or node.target in opsets.TRANSPOSE and \
            sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        return _weight(node.args[0], 2)
    return None


def _weight_op(g: fx.Graph, fn, w: fx.Node, *args, name: str) -> fx.Node:
    """fn(w, *args) for a weight w, placed right after it (for a graph input: after all of them),
    so that any node of the graph may read it; marked as computed from weights alone."""
    with g.inserting_before(body_start(g)) if w.op == "placeholder" else g.inserting_after(w):
        node = call(g, fn, w, *args, name=name)
    node.meta[WEIGHT_VIEW] = True
    return node


def _replace(g: fx.Graph, old: fx.Node, new: fx.Node, meta_from: fx.Node | None = None) -> None:
    new.meta = {k: v for k, v in (meta_from or old).meta.items() if k not in ("val", "example_value")}
    old.replace_all_uses_with(new)
    g.erase_node(old)


# ---- fused projections ----

def split_fused(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """Split `linear` into one linear per part of its output (see the module's doc), in place.
    False, with nothing changed, where its output is not cut into parts or a part's layout does
    not follow from a linear's."""
    if not is_linear(linear) or value(linear) is None or value(linear.args[0]) is None:
        return False
    try:
        plans, chain = _plan_parts(linear)
    except Exception:  # noqa: BLE001 - an op that cannot run on index tensors: the linear stays fused
        return False
    if not plans:
        return False
    g = linear.graph
    w, b = linear.args[1], linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
    weights = {part: (_rows(g, w, rows, part.name), _rows(g, b, rows, part.name) if isinstance(b, fx.Node) else None)
               for part, (rows, _, _) in plans.items()}
    with g.inserting_before(linear):  # where the fused one was: before anything that reads a part
        for part, (_, col_shape, perm) in plans.items():
            out = call(g, F.linear, linear.args[0], *weights[part], name=f"{part.name}_proj")
            if len(col_shape) > 1:
                out = call(g, torch.unflatten, out, -1, col_shape, name=f"{part.name}_heads")
            if perm != tuple(range(len(perm))):
                out = call(g, torch.permute, out, perm, name=f"{part.name}_layout")
            for n in _between(out):  # in the fused linear's module: its block's nodes
                n.meta = {k: v for k, v in linear.meta.items() if k not in ("val", "example_value")}
            part.replace_all_uses_with(out)
    for node in reversed(chain):  # the old cut into parts, now unused
        if not node.users:
            g.erase_node(node)
    return True


def _between(end: fx.Node) -> list[fx.Node]:
    """`end` and the nodes before it back to the part's linear."""
    nodes = [end]
    while not is_linear(nodes[-1]):
        nodes.append(nodes[-1].args[0])
    return nodes


def _rows(g: fx.Graph, w: fx.Node, rows: list[int], name: str) -> fx.Node:
    """The rows of a weight (or bias): a slice (a view) where they are contiguous, else gathered."""
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    index = slice(rows[0], rows[0] + len(rows)) if contiguous else rows
    return _weight_op(g, operator.getitem, w, index, name=f"{name}_{'w' if value(w).dim() == 2 else 'b'}")


def _plan_parts(linear: fx.Node):
    """{part: (the fused rows it reads, in a linear's output order; the shape those columns
    unflatten to; the permutation from [lead dims, column dims] to the part's layout)}, and the
    nodes from the linear to its parts in graph order. No parts where the output is used whole or
    a part does not follow a linear's layout."""
    shape = [hint(s) for s in value(linear).shape]
    lead, n = shape[:-1], shape[-1]
    grids = [torch.arange(n).expand(*lead, n)] + _lead_grids(lead, n)
    whole = {linear: grids}  # nodes that carry every column (a tuple of tensors after a split)
    parts: dict[fx.Node, list[torch.Tensor]] = {}
    for node in _after(linear):
        if not any(a in whole for a in node.all_input_nodes):
            continue
        if not _moves(node, whole):
            return {}, []  # the fused output (or a view of all of it) is used as it is
        outs = [_run(node, whole, i) for i in range(len(grids))]
        if isinstance(outs[0], torch.Tensor) and torch.unique(outs[0]).numel() < n:
            parts[node] = outs
        else:
            whole[node] = outs
    plans = {}
    for part, outs in parts.items():
        plan = _part_layout(outs, grids)
        if plan is None:
            return {}, []
        plans[part] = plan
    return plans, [linear] + [m for m in whole if m is not linear] + list(parts)


def _after(linear: fx.Node):
    found = False
    for node in linear.graph.nodes:
        if found:
            yield node
        found = found or node is linear


def _moves(node: fx.Node, whole: dict) -> bool:
    """A data-movement op whose only tensor input carries the whole fused output."""
    if node.op not in ("call_method", "call_function") or node.target not in opsets.MOVES:
        return False
    tensors = [a for a in node.all_input_nodes if a in whole or value(a) is not None]
    return len(tensors) == 1 and tensors[0] in whole


def _run(node: fx.Node, whole: dict, i: int):
    """Run `node` on the i-th index grid (sizes read off symbols by their hints)."""
    def arg(a):
        if a in whole:
            return whole[a][i]
        v = a.meta.get("example_value", a.meta.get("val"))
        if isinstance(v, (tuple, list)):
            return type(v)(hint(s) if isinstance(s, torch.SymInt) else s for s in v)
        return hint(v) if isinstance(v, (int, torch.SymInt)) else v

    args = fx.node.map_arg(node.args, arg)
    kwargs = fx.node.map_arg(node.kwargs, arg)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _part_layout(outs: list[torch.Tensor], grids: list[torch.Tensor]):
    """How a part (its column grid and lead grids, run from the linear's `grids`) follows from a
    plain linear on its rows: each lead dim must sit on one dim of the part, the other dims carry
    columns only."""
    col, leads = outs[0], outs[1:]
    lead = list(grids[0].shape[:-1])
    dims = list(range(col.dim()))

    def varies(t: torch.Tensor, d: int) -> bool:
        return not bool((t == t.narrow(d, 0, 1)).all())

    where: list[int | None] = []
    for t in leads:
        on = [d for d in dims if varies(t, d)]
        if len(on) > 1:
            return None
        where.append(on[0] if on else None)
    free = [d for d in dims if d not in where]
    for k, d in enumerate(where):  # a lead of size 1 (a batch of one) takes a free dim of size 1
        if d is None:
            ones = [f for f in free if col.shape[f] == 1]
            if lead[k] != 1 or not ones:
                return None
            where[k] = ones[0]
            free.remove(ones[0])
    if len(set(where)) != len(where):
        return None
    first = col[tuple(0 if d in where else slice(None) for d in dims)]  # lead index 0
    rows = first.reshape(-1).tolist()  # its free dims in the part's order
    col_shape = tuple(col.shape[d] for d in free)
    source = {d: k for k, d in enumerate(where)} | {d: len(lead) + j for j, d in enumerate(free)}
    perm = tuple(source[d] for d in dims)
    # check: a linear on `rows`, unflattened and permuted, puts every column and lead index where the part has it
    row_index = torch.tensor(rows)
    expect = [grids[0][..., row_index]] + [g[..., :1].expand(*lead, len(rows)) for g in grids[1:]]
    for got, want in zip(outs, expect):
        if len(col_shape) > 1:
            want = want.unflatten(-1, col_shape)
        if want.dim() != len(perm) or not torch.equal(want.permute(perm), got):
            return None
    return rows, col_shape, perm


def _lead_grids(lead: list[int], n: int) -> list[torch.Tensor]:
    """Each lead dim's index at every position of a (*lead, n) output, as broadcast views (no memory)."""
    shape = lead + [n]
    out = []
    for k, size in enumerate(lead):
        at = [1] * len(shape)
        at[k] = size
        out.append(torch.arange(size).view(at).expand(*shape))
    return out
