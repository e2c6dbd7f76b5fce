"""Independent references the tests compare the pass with: a dense model whose final projections
lose the columns of the pruned heads and channels."""
import torch


def final_projection(layer, attn: bool):
    for name in (["self_attn.o_proj", "self_attn.out_proj"] if attn else ["mlp.down_proj", "fc2"]):
        try:
            return layer.get_submodule(name)
        except AttributeError:
            continue
    raise AssertionError("no final projection")


def zero_pruned(model, selection: dict, head_dim: int, mean: dict | None = None, kinds=("attention", "mlp")):
    """In place: zero the final projections' input columns of every head/channel not in
    `selection` (site -> kept indices), for the sites of `kinds`. With `mean` (site -> mean input),
    add back the pruned columns' mean contribution, as FLAP does. Returns the model."""
    with torch.no_grad():
        for site, kept in selection.items():
            attn = site.endswith("attention")
            if ("attention" if attn else "mlp") not in kinds:
                continue
            final = final_projection(model.get_submodule(site.rsplit(".", 1)[0]), attn)
            cols = torch.ones(final.weight.shape[1], dtype=torch.bool)
            idx = (kept[:, None] * head_dim + torch.arange(head_dim)).flatten() if attn else kept
            cols[idx] = False
            if mean is not None:
                comp = final.weight[:, cols].double() @ mean[site][cols]
                final.register_forward_hook(lambda m, a, out, comp=comp: out + comp.to(out.dtype))
            final.weight[:, cols] = 0.0
    return model


def zero_final_inputs(model, selection: dict, finals: dict, head_dims: dict):
    """In place, for any layout of the final projection's weight (nn.Linear, GPT-2's Conv1D,
    Falcon's x @ W.T): a forward pre-hook that zeroes the input channels of every head/channel
    not in `selection` (site -> kept indices). `finals`: site -> the final projection's module
    path; `head_dims`: site -> head_dim (attention) or 1 (MLP). Returns the model."""
    for site, kept in selection.items():
        d = head_dims[site]
        idx = (kept[:, None] * d + torch.arange(d)).flatten()

        def zero(module, args, idx=idx):
            x = args[0].clone()
            keep = torch.zeros(x.shape[-1], dtype=torch.bool)
            keep[idx] = True
            x[..., ~keep] = 0.0
            return (x,) + tuple(args[1:])

        model.get_submodule(finals[site]).register_forward_pre_hook(zero)
    return model
