"""First-order Taylor importance (LLM-Pruner style, element-wise, "sum" aggregation); a baseline.

The gradient g of the mean next-token loss over all calibration blocks is accumulated in float32 (batch losses
weighted by their share of the blocks); the importance of a weight is |w * g| and a unit's importance is the sum
over its weights (and its q/k/v or gate/up bias entries, when the family has them):
* heads: q_proj rows of the G query heads, k_proj / v_proj rows, o_proj columns;
* channels: gate_proj and up_proj rows, down_proj column;
* layers: sum of the layer's head and channel importances.

Only the prunable linear weights get requires_grad during the pass; the gradient of each is moved into a float32
accumulator as soon as it is produced (post-accumulate-grad hook), so memory is the model, one float32 copy of
the prunable weights and the activations of one batch. Afterwards every requires_grad flag is restored, every
.grad is None and the weights are untouched.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pgprune.core.adapters import get_adapter
from pgprune.core.weights import require_in_memory
from pgprune.scorers.activations import check_batch_size, check_calib, check_o_columns, input_device


def taylor_scores(model, calib, *, batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    require_in_memory(model, "the taylor scorer")
    calib = check_calib(calib)
    batch_size = check_batch_size(batch_size)
    adapter = get_adapter(model)
    layout = adapter.layout()
    parts = [adapter.parts(i) for i in range(layout.num_layers)]
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets: list[torch.nn.Parameter] = []
    for p in parts:
        for n in names:
            lin = getattr(p, n)
            targets.append(lin.weight)
            if lin.bias is not None and n not in ("o_proj", "down_proj"):
                targets.append(lin.bias)
    saved_flags = [(t, t.requires_grad) for t in model.parameters()]
    saved_grads = [t for t in model.parameters() if t.grad is not None]
    was_training = model.training
    acc = {id(t): torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in targets}

    def grab(t):
        acc[id(t)].add_(t.grad.float())
        t.grad = None

    handles = []
    n = calib.shape[0]
    dev = input_device(model)
    try:
        for t in model.parameters():
            t.requires_grad_(False)
        for t in targets:
            t.requires_grad_(True)
            handles.append(t.register_post_accumulate_grad_hook(grab))
        for t in saved_grads:
            t.grad = None
        model.eval()
        with torch.enable_grad():
            for s in tqdm(range(0, n, batch_size), desc="taylor", disable=not progress,
                          total=(n + batch_size - 1) // batch_size):
                ids = calib[s:s + batch_size].to(dev)
                out = model(input_ids=ids, labels=ids, use_cache=False)
                (out.loss * (ids.shape[0] / n)).backward()
                del out
    finally:
        for h in handles:
            h.remove()
        for t, flag in saved_flags:
            t.requires_grad_(flag)
            t.grad = None
        model.train(was_training)

    def imp(t) -> torch.Tensor:
        return (t.detach().float() * acc[id(t)]).abs()

    hd, g = layout.head_dim, layout.group_size
    heads, chans, layers = [], [], []
    with torch.no_grad():
        for i, p in enumerate(parts):
            n_kv = layout.kv_heads[i]
            check_o_columns(layout, i, p.o_proj.in_features)
            h = imp(p.q_proj.weight).sum(1).reshape(n_kv, g * hd).sum(1)
            h += imp(p.k_proj.weight).sum(1).reshape(n_kv, hd).sum(1)
            h += imp(p.v_proj.weight).sum(1).reshape(n_kv, hd).sum(1)
            h += imp(p.o_proj.weight).sum(0).reshape(n_kv, g * hd).sum(1)
            for lin, per in ((p.q_proj, g * hd), (p.k_proj, hd), (p.v_proj, hd)):
                if lin.bias is not None:
                    h += imp(lin.bias).reshape(n_kv, per).sum(1)
            c = imp(p.gate_proj.weight).sum(1) + imp(p.up_proj.weight).sum(1) + imp(p.down_proj.weight).sum(0)
            for lin in (p.gate_proj, p.up_proj):
                if lin.bias is not None:
                    c += imp(lin.bias)
            heads.append(h.double().cpu())
            chans.append(c.double().cpu())
            layers.append(h.double().sum().cpu() + c.double().sum().cpu())
    return {"heads": torch.cat(heads).float(), "channels": torch.cat(chans).float(),
            "layers": torch.stack(layers).float()}
