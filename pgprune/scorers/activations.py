"""Calibration statistics shared by the activation-based scorers (Wanda-sp, FLAP, ShortGPT).

One dense pass of the calibration blocks through the model, with hooks:

* a forward pre-hook on every layer's ``o_proj`` and ``down_proj`` accumulates, per input column, the token count,
  the running mean and the sum of squared deviations (Chan/Welford merge of per-chunk moments, float64) and the
  sum of squares (float64). The o_proj input has one column per query-head dimension (query head h owns columns
  h*head_dim .. (h+1)*head_dim-1; the G query heads of KV group k are heads k*G .. k*G+G-1), the down_proj input
  one column per intermediate channel;
* a forward hook on every decoder layer accumulates the sum over tokens of cos(layer input, layer output) for
  ShortGPT's Block Influence.

Memory stays bounded: only per-column moments are kept (a few vectors per layer), never the activations; the
float64 conversion is done in chunks of rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pgprune.core.adapters import get_adapter
from pgprune.core.adapters.base import Layout
from pgprune.errors import PgpruneError

_CHUNK_ELEMS = 1 << 23  # float64 elements converted at a time (64 MiB)


class RunningMoments:
    """Per-column count, mean, M2 (sum of squared deviations) and sum of squares, merged batch by batch."""

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        rows = max(1, _CHUNK_ELEMS // max(1, x.shape[-1]))
        for s in range(0, x.shape[0], rows):
            c = x[s:s + rows].double()
            nb = c.shape[0]
            mb = c.mean(0)
            m2b = ((c - mb) ** 2).sum(0)
            sq = (c * c).sum(0)
            if self.mean is None:
                self.n, self.mean, self.m2, self.sumsq = nb, mb, m2b, sq
                continue
            tot = self.n + nb
            delta = mb - self.mean
            self.mean = self.mean + delta * (nb / tot)
            self.m2 = self.m2 + m2b + delta * delta * (self.n * nb / tot)
            self.sumsq = self.sumsq + sq
            self.n = tot

    def _check(self):
        if self.mean is None or self.n == 0:
            raise PgpruneError("no calibration tokens reached this module; give at least one calibration block")

    @property
    def var(self) -> torch.Tensor:
        """Population variance over tokens (divides by the token count)."""
        self._check()
        return self.m2 / self.n

    @property
    def sqmean(self) -> torch.Tensor:
        """mean over tokens of x_c^2."""
        self._check()
        return self.sumsq / self.n

    def cpu(self) -> "RunningMoments":
        out = RunningMoments()
        out.n = self.n
        out.mean, out.m2, out.sumsq = (None if t is None else t.cpu() for t in (self.mean, self.m2, self.sumsq))
        return out


@dataclass
class ActivationStats:
    """Per-layer input statistics of o_proj / down_proj and the Block-Influence accumulators (all on CPU)."""

    layout: Layout
    o_proj: list[RunningMoments]
    down_proj: list[RunningMoments]
    cos_sum: torch.Tensor  # float64 [num_layers]: sum over tokens of cos(h_in, h_out)
    n_tokens: int
    extra: dict = field(default_factory=dict)

    def block_influence(self) -> torch.Tensor:
        """ShortGPT BI_l = 1 - mean_tokens cos(h_in_l, h_out_l)  (float64 [num_layers])."""
        if self.n_tokens == 0:
            raise PgpruneError("no calibration tokens were seen")
        return 1.0 - self.cos_sum / self.n_tokens


def check_calib(calib, need: bool = True) -> torch.Tensor | None:
    """Validate calibration blocks: a 2-D integer tensor [n_blocks, seq_len] with n_blocks >= 1."""
    if calib is None:
        if need:
            raise PgpruneError("this scorer needs calibration blocks (LongTensor [n_blocks, seq_len]); got None")
        return None
    if not isinstance(calib, torch.Tensor):
        calib = torch.as_tensor(calib)
    if calib.dim() != 2 or calib.shape[0] < 1 or calib.shape[1] < 1:
        raise PgpruneError(f"calibration blocks must be a 2-D tensor [n_blocks, seq_len] with at least one token; "
                           f"got shape {tuple(calib.shape)}")
    if calib.is_floating_point() or calib.is_complex() or calib.dtype == torch.bool:
        raise PgpruneError(f"calibration blocks must hold integer token ids; got dtype {calib.dtype}")
    return calib.long()


def check_batch_size(batch_size) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise PgpruneError(f"batch_size must be a positive integer; got {batch_size!r}")
    return batch_size


def input_device(model) -> torch.device:
    return get_adapter(model).decoder().embed_tokens.weight.device


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def collect_activation_stats(model, calib: torch.Tensor, *, batch_size: int = 8, progress: bool = True,
                             desc: str = "calibration stats") -> ActivationStats:
    """Run the calibration blocks (dense model) and accumulate the statistics described in the module docstring."""
    calib = check_calib(calib)
    batch_size = check_batch_size(batch_size)
    from pgprune.core.weights import is_streamed

    if is_streamed(model):
        return _collect_streamed(model, calib, batch_size, progress, desc)
    adapter = get_adapter(model)
    layout = adapter.layout()
    n_layers = layout.num_layers
    o_stats = [RunningMoments() for _ in range(n_layers)]
    d_stats = [RunningMoments() for _ in range(n_layers)]
    cos_sum = torch.zeros(n_layers, dtype=torch.float64)
    handles = []

    def pre_hook(acc: RunningMoments):
        def fn(_module, args):
            acc.update(args[0])
        return fn

    def layer_hook(i: int):
        def fn(_module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = _layer_output(out)
            cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)
            cos_sum[i] += cos.double().sum().cpu()
        return fn

    layers = adapter.layers()
    for i in range(n_layers):
        p = adapter.parts(i)
        handles.append(p.o_proj.register_forward_pre_hook(pre_hook(o_stats[i])))
        handles.append(p.down_proj.register_forward_pre_hook(pre_hook(d_stats[i])))
        handles.append(layers[i].register_forward_hook(layer_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    dev = input_device(model)
    n_tokens = 0
    try:
        for s in tqdm(range(0, calib.shape[0], batch_size), desc=desc, disable=not progress,
                      total=(calib.shape[0] + batch_size - 1) // batch_size):
            ids = calib[s:s + batch_size].to(dev)
            adapter.decoder()(input_ids=ids, use_cache=False)
            n_tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for i in range(n_layers):
        if o_stats[i].n != n_tokens or d_stats[i].n != n_tokens:
            raise PgpruneError(f"layer {i}: hooks saw {o_stats[i].n}/{d_stats[i].n} tokens, expected {n_tokens}; "
                               "the model's forward does not call o_proj/down_proj once per token")
    return ActivationStats(layout, [m.cpu() for m in o_stats], [m.cpu() for m in d_stats], cos_sum, n_tokens)


def _collect_streamed(model, calib: torch.Tensor, batch_size: int, progress: bool, desc: str) -> ActivationStats:
    """The same statistics through the layer-major executor (a model loaded with offload cpu/disk or a device map):
    every calibration block passes through layer i (loaded once) before layer i+1; the taps see the inputs of
    o_proj / down_proj and the layer's input/output, batch by batch in the same order as the hooks above."""
    from pgprune.core.masked_forward import MaskedModel

    mm = MaskedModel(model)
    layout = mm.layout
    n_layers = layout.num_layers
    o_stats = [RunningMoments() for _ in range(n_layers)]
    d_stats = [RunningMoments() for _ in range(n_layers)]
    cos_acc: list[torch.Tensor | None] = [None] * n_layers  # float64 scalars on each layer's device

    def taps(i: int, kind: str, x: torch.Tensor, out: torch.Tensor | None = None) -> None:
        if kind == "o_proj":
            o_stats[i].update(x)
        elif kind == "down_proj":
            d_stats[i].update(x)
        else:
            c = F.cosine_similarity(x.float(), out.float(), dim=-1, eps=1e-8).double().sum()
            cos_acc[i] = c if cos_acc[i] is None else cos_acc[i] + c

    n_tokens = mm.scan(calib, taps, batch_size=batch_size, progress=progress, desc=desc)
    cos_sum = torch.stack([c.cpu() for c in cos_acc])
    return ActivationStats(layout, [m.cpu() for m in o_stats], [m.cpu() for m in d_stats], cos_sum, n_tokens)


# --- grouping helpers shared by the scorers -------------------------------------------------------------------
def check_o_columns(layout: Layout, i: int, n_cols: int) -> None:
    want = layout.kv_heads[i] * layout.group_size * layout.head_dim
    if n_cols != want:
        raise PgpruneError(f"layer {i}: o_proj has {n_cols} input columns, the layout expects {want} "
                           f"(kv_heads={layout.kv_heads[i]} x group={layout.group_size} x head_dim={layout.head_dim})")


def head_columns_to_groups(col: torch.Tensor, layout: Layout, i: int, query_reduce: str = "mean",
                           dim_reduce: str = "sum") -> torch.Tensor:
    """Reduce a per-column o_proj quantity [n_kv*G*hd] to one value per KV group.

    ``dim_reduce`` over the head_dim columns of each query head, then ``query_reduce`` over the G query heads of the
    group ("sum" or "mean" each). head_dim and G come from the layout (never hard-coded).
    """
    check_o_columns(layout, i, col.numel())
    x = col.reshape(layout.kv_heads[i], layout.group_size, layout.head_dim)
    x = x.sum(-1) if dim_reduce == "sum" else x.mean(-1)
    return x.sum(-1) if query_reduce == "sum" else x.mean(-1)


def q_rows_of_groups(layout: Layout) -> int:
    """Query rows per KV group."""
    return layout.group_size * layout.head_dim
