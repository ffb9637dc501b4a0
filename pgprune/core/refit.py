"""Least-squares refit of the kept weights of o_proj and down_proj after masking (SlimGPT's OBS update, any mask).

For every kept decoder layer i, in order, and each of its two output projections (o_proj first, then down_proj with
the layer's attention already pruned and refit), let X be the module's full input on the calibration tokens *of the
pruned, already refit model* (the calibration blocks flow through layers 0..i-1 as pruned + refit, and through the
refit o_proj of layer i before down_proj is fitted), split into the kept inputs X_K and the removed ones X_S (the
mask's columns: a KV-group unit removes the head_dim columns of its G query heads in o_proj, a channel its column in
down_proj). The target is the dense module on those inputs, Y = W X + b = W_K X_K + W_S X_S + b, and the kept weights
and the bias are refit by (damped) least squares with an intercept:

    min_{W', b'}  sum_tokens ||Y - W' X_K - b'||^2  +  lam * N * ||W' - W_K||^2

With Z = [X_K; 1] (one row of ones: the intercept), H = Z Z^T / N ((k+1)x(k+1), k kept inputs, N tokens),
C = X_S Z^T / N and D = diag(1, .., 1, 0) (no damping on the intercept), the solution is

    [W' - W_K, b' - b] = W_S C (H + lam D)^-1,

i.e. without the intercept W' = W_K + W_S H_SK H_KK^-1, SlimGPT's (OBS) update of the kept columns for the removed
set S. The intercept makes FLAP's bias compensation the special case W' = W_K: the best b' is then
b + W_S mean(X_S). Since that point is feasible with zero damping penalty, the refit's calibration error is never
larger than bias-only compensation's, whatever lam (and lam -> infinity gives back bias-only compensation).

Numerics: the Gram matrices are accumulated in float64 on the layer's device, lam = damp * mean(diag(H_KK)) (the
normalised Gram), the system is solved by Cholesky in float64. Where the factorisation fails or is numerically
singular (dead or constant inputs, fewer tokens than unknowns) lam is raised tenfold until it is not, with a
warning; the result is always finite. The refit weights are returned in the model's dtype (rounded once from float64
through float32, the cast slicing applies anyway: a bfloat16 model's refit holds half the bytes) and the biases in
float32; the model's own dtype is used to propagate the calibration blocks (what the sliced model computes). The
solve works in place on the normalised statistics (at most three (k+1)^2 float64 matrices at once per module).

Differences from SlimGPT (Ling et al., 2024): SlimGPT also *chooses* S (greedily, column group by column group, with
its OBS error and a dynamic group size) and updates the remaining columns after each choice; here S is given by the
mask and the update is done once, in closed form, for all of S. SlimGPT has no intercept; here the bias is refit too
(so the result is at least as good as FLAP's bias compensation on the calibration data). The damping here pulls the
kept weights towards their original values (a ridge around W_K), which is what SlimGPT's lam*I on the Hessian does.

API: :func:`refit_weights` (the per-layer refit weights), :func:`apply_refit` (them in the form slicing takes,
:class:`RefitBiases`: the ``extra_bias`` that :func:`pgprune.hf.slicing.slice_model` adds to the output biases,
carrying the refit kept columns; no copy of the model), :func:`refit_model` (both), :func:`refit_logits` (the masked
refit model's logits without slicing, the same computation that propagates the calibration blocks).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pgprune.core.adapters import get_adapter
from pgprune.core.adapters.base import Layout
from pgprune.core.masked_forward import _FULL, MaskedModel
from pgprune.core.masks import Masks
from pgprune.core.spill import Spill
from pgprune.core.weights import fixed_mmap_threshold, layer_parts, return_freed_memory
from pgprune.errors import PgpruneError

MODULES = ("o_proj", "down_proj")
Refit = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]
# select(layer, module name, module, full-input sums g [m+1, m+1] float64, tokens) -> bool keep-mask of its units
Selector = Callable[[int, str, torch.nn.Linear, torch.Tensor, int], torch.Tensor]

_CONST_REL = 1e-9  # a kept input whose calibration variance is below this fraction of its mean square is constant
_PIVOT_REL = 1e-12  # smallest accepted squared Cholesky pivot of the unit-diagonal (Jacobi-scaled) system
_MAX_RAISES = 24  # tenfold damping increases before giving up
_STACK = 5  # warnings point at refit_weights' caller (_solve, _run, its no_grad wrapper, refit_weights)


def kept_columns(layout: Layout, masks: Masks, i: int) -> dict[str, torch.Tensor]:
    """Kept input columns (long, ascending) of layer i's o_proj (the G*head_dim columns of every kept KV group) and
    down_proj (the kept channels), in the order slicing keeps them."""
    hd, g = layout.head_dim, layout.group_size
    kv = torch.nonzero(masks.heads[i]).flatten()
    heads = (kv[:, None] * g + torch.arange(g)[None, :]).flatten()
    o_cols = (heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()
    return {"o_proj": o_cols, "down_proj": torch.nonzero(masks.channels[i]).flatten()}


def _removed(n: int, kept: torch.Tensor) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    return torch.nonzero(~keep).flatten()


def _check_blocks(blocks, what: str = "calibration blocks") -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 1:
        got = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise PgpruneError(f"{what} must be a token-id tensor [n_blocks >= 1, T >= 1]; got {got}")
    if blocks.dtype not in (torch.int64, torch.int32):
        raise PgpruneError(f"{what} must hold integer token ids; got dtype {blocks.dtype}")
    return blocks


def _check_finite(x: torch.Tensor, i: int, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise PgpruneError(f"layer {i} {name}: the calibration activations (the module's input under the masks, "
                           "after the refit of the layers before) hold NaN/inf; the refit cannot use them (check the "
                           "model's weights and dtype: float16 overflows where bfloat16/float32 do not)")


class _Gram:
    """Sums over calibration tokens of Z Z^T and X_S Z^T, Z = [X_K; 1], in float64."""

    def __init__(self, k: int, s: int, device: torch.device):
        self.h = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=device)
        self.c = torch.zeros(s, k + 1, dtype=torch.float64, device=device)
        self.n = 0

    @classmethod
    def view(cls, g: torch.Tensor, n: int, kept: torch.Tensor, removed: torch.Tensor) -> "_Gram":
        """The statistics of the split (kept, removed) read out of the full sums ``g`` = sum z z^T, z = [x; 1]
        (float64 [m+1, m+1] over all m inputs, the ones row last) of ``n`` tokens."""
        idx = torch.cat([kept.cpu(), torch.tensor([g.shape[0] - 1])]).to(g.device)  # kept inputs and the ones row
        out = cls.__new__(cls)
        out.h, out.c, out.n = g[idx][:, idx], g[removed.to(g.device)][:, idx], n
        return out

    @staticmethod
    def full(xs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum z z^T float64 [m+1, m+1], tokens) over the batches ``xs`` ([rows, t, m] each), z = [x; 1]."""
        g, n = None, 0
        for x in xs:
            z = torch.cat([x.reshape(-1, x.shape[-1]).double(),
                           torch.ones(x.numel() // x.shape[-1], 1, dtype=torch.float64, device=x.device)], dim=1)
            g = z.t() @ z if g is None else g.addmm_(z.t(), z)  # [m+1, m+1]
            n += z.shape[0]
        return g, n

    def add(self, x_k: torch.Tensor, x_s: torch.Tensor) -> None:
        z = torch.cat([x_k.reshape(-1, x_k.shape[-1]).double(),
                       torch.ones(x_k.numel() // max(1, x_k.shape[-1]), 1, dtype=torch.float64, device=x_k.device)],
                      dim=1)  # [tokens, k+1]
        self.h.addmm_(z.t(), z)
        self.c.addmm_(x_s.reshape(-1, x_s.shape[-1]).double().t(), z)
        self.n += z.shape[0]


def _solve(w: torch.Tensor, b: torch.Tensor | None, kept: torch.Tensor, removed: torch.Tensor, gram: _Gram,
           damp: float, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' [out, k] in the weight's dtype, b' [out] float32) from the statistics ``gram`` (see the module docstring;
    ``gram`` is consumed: normalised in place and emptied).

    Memory (k kept inputs, ``out`` rows): at most two (k+1)^2 float64 matrices (the normalised Gram, factored in
    place, and its Cholesky factor) and two [out, k+1] float64 ones (the right-hand side and the solution) at once."""
    k, n = kept.numel(), gram.n
    dev = gram.h.device
    b0 = b.to(dev, torch.float64) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64, device=dev)
    if removed.numel() == 0:  # nothing removed: the module is unchanged
        return w[:, kept.to(w.device)].cpu(), b0.float().cpu()  # a copy of the kept columns (gathered)
    if n < k + 1:
        warnings.warn(f"refit {where}: {n} calibration tokens for {k} kept inputs (+1 intercept): the least-squares "
                      "problem is underdetermined and the result rests on the damping; use more calibration tokens",
                      RuntimeWarning, stacklevel=_STACK)
    hn = gram.h.div_(n)  # the normalised statistics, in place: _solve consumes ``gram``
    rhs = (w[:, removed.to(w.device)].to(dev, torch.float64) @ gram.c.div_(n)).t()  # [(k+1), out] = (W_S C)^T
    gram.h = gram.c = None  # C is no longer needed; H lives on as hn
    diag = torch.diagonal(hn)[:k]
    var = diag - hn[:k, k] ** 2
    n_const = int((var <= _CONST_REL * diag).sum())
    if n_const:
        warnings.warn(f"refit {where}: {n_const} of {k} kept inputs are constant on the {n} calibration tokens (dead "
                      "or constant activations); their refit weights rest on the damping", RuntimeWarning,
                      stacklevel=_STACK)
    scale = float(diag.mean())
    if not scale > 0:
        scale = 1.0
    del diag, var
    lam0 = lam = damp * scale
    dmask = torch.ones(k + 1, dtype=torch.float64, device=dev)
    dmask[k] = 0.0
    delta = None
    for attempt in range(_MAX_RAISES + 1):
        # hn + lam D, Jacobi-scaled to a unit diagonal, is formed in place in hn; a retry first undoes the last
        # attempt's scaling and damping (the Cholesky factor is a separate matrix, hn is only read)
        if attempt:
            hn.div_(sc[:, None]).div_(sc[None, :])
            torch.diagonal(hn).sub_(lam_prev * dmask)
        torch.diagonal(hn).add_(lam * dmask)
        d = torch.diagonal(hn)
        sc = torch.where(d > 0, d, torch.ones_like(d)).rsqrt()  # Jacobi scaling: unit diagonal, scale-free pivots
        chol, info = torch.linalg.cholesky_ex(hn.mul_(sc[:, None]).mul_(sc[None, :]))
        if int(info) == 0 and float(torch.diagonal(chol).min()) ** 2 >= _PIVOT_REL:
            sol = torch.cholesky_solve(rhs.mul_(sc[:, None]), chol).mul_(sc[:, None])
            del chol
            if bool(torch.isfinite(sol).all()):
                delta = sol.t()  # [out, k+1]
                break
            rhs.div_(sc[:, None])
            del sol
        else:
            del chol
        lam_prev, lam = lam, max(lam * 10.0, 1e-6 * scale)
    del hn, rhs
    if delta is None:
        raise PgpruneError(f"refit {where}: the Gram matrix of the calibration inputs stayed singular up to damping "
                           f"{lam:.3g}; check the calibration data")
    if lam != lam0:
        warnings.warn(f"refit {where}: the Gram matrix is (numerically) singular; raised the damping from "
                      f"{lam0:.3g} to {lam:.3g} (= {lam / scale:.3g} * mean diagonal)", RuntimeWarning,
                      stacklevel=_STACK)
    bias = (b0 + delta[:, k]).float().cpu()
    w_new = delta[:, :k].add_(w[:, kept.to(w.device)].to(dev, torch.float64))  # W_K + delta, in place
    return w_new.float().to(w.dtype).cpu(), bias


def _extra_bias(lin, bias32: torch.Tensor) -> torch.Tensor:
    """What slice_model must add to ``lin``'s bias (zeros where it has none) to get the refit bias."""
    base = lin.bias.detach().float().cpu() if lin.bias is not None else torch.zeros_like(bias32)
    return bias32 - base


def _propagation(lin, w32: torch.Tensor, bias32: torch.Tensor, device, dtype):
    """The weight and bias, in the model's dtype, that the sliced refit model uses (slice_model's rule: its bias
    is the source bias, or zeros, plus extra_bias cast to the bias dtype)."""
    extra = _extra_bias(lin, bias32)
    base = lin.bias.detach().to(device) if lin.bias is not None else torch.zeros(w32.shape[0], dtype=dtype,
                                                                                  device=device)
    return w32.to(device, dtype), base + extra.to(device, base.dtype)


def _attention_input(mm: MaskedModel, i: int, p, h: torch.Tensor, cos, sin) -> torch.Tensor:
    """o_proj's input of every query head [rows, t, heads*hd] (the dense attention of layer i on h)."""
    got = []

    def taps(_i, name, x, *rest):
        if name == "o_proj":
            got.append(x)

    mm._attention(i, p, p.input_norm(h), cos, sin, _FULL, taps)
    return got[0]


def _mlp_rows(p, rows: torch.Tensor, device) -> tuple:
    """gate/up weights and biases of the channels ``rows`` (gathered once per layer)."""
    r = rows.to(device)
    return (p.gate_proj.weight[r], p.gate_proj.bias[r] if p.gate_proj.bias is not None else None,
            p.up_proj.weight[r], p.up_proj.bias[r] if p.up_proj.bias is not None else None)


def _mlp_input(p, x: torch.Tensor, rows: tuple) -> torch.Tensor:
    """act(gate) * up of the gathered channels ``rows`` (down_proj's input restricted to them)."""
    wg, bg, wu, bu = rows
    return p.act_fn(F.linear(x, wg, bg)) * F.linear(x, wu, bu)


@torch.no_grad()
def _run(model, masks: Masks, blocks: torch.Tensor, batch_size: int, progress: bool, refit: Refit | None,
         damp: float, select: Selector | None = None, spill=None) -> tuple[Refit, MaskedModel, list[torch.Tensor]]:
    """Layer-major pass of ``blocks`` through the masked model whose kept o_proj/down_proj weights are ``refit``
    (given) or fitted on the way (``refit=None``). Returns the refit and the final (pre-norm) hidden states.

    With ``select`` (fitting only) the masks of each kept layer are *chosen* on the way and written into ``masks``:
    before a module is fitted, ``select(i, name, lin, g, n)`` gets the module, the sums g = sum z z^T of its full
    input z = [x; 1] (float64 [m+1, m+1], the ones row last) over the n calibration tokens of the pruned, refit
    model so far, and returns the bool keep-mask of layer i's KV groups (o_proj) or channels (down_proj).

    ``spill`` (fitting only; see :func:`refit_weights`): None (spill when a layer streams from disk), False, True
    (the system temporary directory) or a folder."""
    mm = MaskedModel(model)
    layout = mm.layout
    masks.validate(layout)
    blocks = _check_blocks(blocks, "calibration blocks" if refit is None else "input_ids")
    if batch_size < 1:
        raise PgpruneError(f"batch_size={batch_size}; allowed: >= 1")
    fit = refit is None
    if select is not None and not fit:
        raise PgpruneError("masks are chosen (select) only while fitting the refit, not with given refit weights")
    out: Refit = {} if fit else refit
    if spill is None:
        spill = "disk" in mm.source.homes
    spiller = Spill(None if spill is True else spill) if fit and spill is not False else None
    if mm.source.streamed:
        fixed_mmap_threshold()  # freed buffers go back to the OS: resident memory follows what is alive
    ids = blocks.to(mm.device)
    hs = [mm.adapter.embed(ids[s:s + batch_size]) for s in range(0, ids.shape[0], batch_size)]
    t = ids.shape[1]
    cache: dict = {}
    layers = range(layout.num_layers)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="refit" if fit else "refit forward", unit="layer")
    try:
        for i in layers:
            if not masks.layer_kept(i):
                continue
            if not fit and i not in out:
                raise PgpruneError(f"the refit weights have no entry for kept layer {i}")
            dev = mm.source.devices[i]
            with mm.source.layer(i) as p:
                hs = [h if h.device == dev else h.to(dev) for h in hs]
                dtype = hs[0].dtype
                cos, sin = mm._rotary(t, hs[0], cache, dev)
                if fit:
                    out[i] = {}
                # attention: o_proj
                if select is not None:  # choose the layer's KV groups on its full input, then fit as below
                    xs = []
                    for h in hs:
                        xs.append(_attention_input(mm, i, p, h, cos, sin))
                        _check_finite(xs[-1], i, "o_proj")
                    g, ntok = _Gram.full(xs)
                    masks.heads[i] = select(i, "o_proj", p.o_proj, g, ntok)
                    masks.check_tensors()
                cols = kept_columns(layout, masks, i)
                kept = cols["o_proj"]
                removed = _removed(p.o_proj.in_features, kept)
                kd, rd = kept.to(dev), removed.to(dev)
                if select is not None:
                    gram = _Gram.view(g, ntok, kept, removed) if removed.numel() else None
                    xk = [x.index_select(-1, kd) for x in xs]
                    del xs, g
                else:
                    gram = _Gram(kept.numel(), removed.numel(), dev) if fit and removed.numel() else None
                    xk = []
                    for h in hs:
                        x = _attention_input(mm, i, p, h, cos, sin)
                        _check_finite(x, i, "o_proj")
                        xk.append(x.index_select(-1, kd))
                        if gram is not None:
                            gram.add(xk[-1], x.index_select(-1, rd))
                if fit:
                    out[i]["o_proj"] = _solve(p.o_proj.weight, p.o_proj.bias, kept, removed, gram or _Gram(0, 0, dev),
                                              damp, f"layer {i} o_proj")
                w, b = _propagation(p.o_proj, *_checked(out, i, "o_proj", p.o_proj, kept), dev, dtype)
                hs = [h + F.linear(x, w, b) for h, x in zip(hs, xk)]
                del xk
                # MLP: down_proj
                xk = None
                if select is not None:  # choose the layer's channels on their full input, then fit on the split
                    every = torch.arange(p.down_proj.in_features)
                    rows_all = _mlp_rows(p, every, dev)
                    xs = []
                    for h in hs:
                        xs.append(_mlp_input(p, p.post_attention_norm(h), rows_all))
                        _check_finite(xs[-1], i, "down_proj")
                    g, ntok = _Gram.full(xs)
                    masks.channels[i] = select(i, "down_proj", p.down_proj, g, ntok)
                    masks.check_tensors()
                    kept = kept_columns(layout, masks, i)["down_proj"]
                    removed = _removed(p.down_proj.in_features, kept)
                    out[i]["down_proj"] = _solve(p.down_proj.weight, p.down_proj.bias, kept, removed,
                                                 _Gram.view(g, ntok, kept, removed) if removed.numel()
                                                 else _Gram(0, 0, dev), damp, f"layer {i} down_proj")
                    xk = [x.index_select(-1, kept.to(dev)) for x in xs]
                    del xs, g, rows_all
                kept = kept_columns(layout, masks, i)["down_proj"]
                removed = _removed(p.down_proj.in_features, kept)
                rows_k = _mlp_rows(p, kept, dev)
                if fit and xk is None:
                    gram = _Gram(kept.numel(), removed.numel(), dev) if removed.numel() else None
                    if gram is not None:
                        rows_s = _mlp_rows(p, removed, dev)
                        for h in hs:
                            xm = p.post_attention_norm(h)
                            x_k, x_s = _mlp_input(p, xm, rows_k), _mlp_input(p, xm, rows_s)
                            _check_finite(x_k, i, "down_proj")
                            _check_finite(x_s, i, "down_proj")
                            gram.add(x_k, x_s)
                        del rows_s, xm, x_k, x_s  # the removed channels' gate/up rows: not needed for the solve
                    out[i]["down_proj"] = _solve(p.down_proj.weight, p.down_proj.bias, kept, removed,
                                                 gram or _Gram(0, 0, dev), damp, f"layer {i} down_proj")
                w, b = _propagation(p.down_proj, *_checked(out, i, "down_proj", p.down_proj, kept), dev, dtype)
                new = []
                for j, h in enumerate(hs):
                    x_k = _mlp_input(p, p.post_attention_norm(h), rows_k) if xk is None else xk[j]
                    if not fit:
                        _check_finite(x_k, i, "down_proj")
                    new.append(h + F.linear(x_k, w, b))
                hs = new
                del xk
                if spiller is not None:
                    out[i] = spiller.put(out[i])  # the layer's refit weights: mapped from disk, not resident
                return_freed_memory()  # this layer's temporaries: resident memory stays one layer's worth
    finally:
        mm.source.release()
        if spiller is not None:
            spiller.close()  # POSIX: the files are unlinked and stay mapped; elsewhere they go at exit
    head = mm._head_device
    return out, mm, [h if h.device == head else h.to(head) for h in hs]


def _checked(refit: Refit, i: int, name: str, lin, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if name not in refit[i]:
        raise PgpruneError(f"the refit weights of layer {i} have no {name!r}; allowed keys: {', '.join(MODULES)}")
    w32, b32 = refit[i][name]
    if tuple(w32.shape) != (lin.out_features, kept.numel()) or tuple(b32.shape) != (lin.out_features,):
        raise PgpruneError(f"layer {i} {name}: refit weight {tuple(w32.shape)} / bias {tuple(b32.shape)} do not fit "
                           f"the masks; expected ({lin.out_features}, {kept.numel()}) / ({lin.out_features},)")
    return w32, b32


def refit_weights(model, masks: Masks, calib_blocks: torch.Tensor, *, damp: float = 0.01, batch_size: int = 8,
                  progress: bool = True, spill=None) -> Refit:
    """Refit the kept weights of o_proj and down_proj of every kept layer (see the module docstring).

    ``calib_blocks``: token ids [n_blocks, T]. ``damp``: the damping relative to the mean diagonal of the kept
    inputs' Gram matrix (>= 0; raised automatically, with a warning, where the system is singular).
    Returns {layer: {"o_proj": (weight [hidden, kept columns], bias float32 [hidden]),
    "down_proj": (weight [hidden, kept channels], bias float32 [hidden])}} (weights in the model's dtype) for every
    kept layer (dropped layers have no entry; a module with nothing removed gets its own weights). The biases are
    the whole refit output biases (the module's own bias, or zero, plus the correction). Deterministic for the same
    inputs.

    ``spill``: where each layer's refit weights go once fitted (:class:`pgprune.core.spill.Spill`: the same bytes,
    mapped from a file instead of held in memory). None (default): spilled to the system temporary directory when
    the model streams layers from disk (``offload="disk"``: the result would otherwise be the largest thing in
    memory), kept in memory otherwise; False: never; True: always; a folder: spilled there."""
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and damp >= 0 and damp < float("inf")):
        raise PgpruneError(f"damp={damp!r}; allowed: a finite number >= 0 (default 0.01)")
    refit, _, _ = _run(model, masks, calib_blocks, batch_size, progress, None, float(damp), spill=spill)
    return refit


def select_and_refit(model, calib_blocks: torch.Tensor, select: Selector, *, damp: float = 0.01,
                     batch_size: int = 8, progress: bool = True) -> tuple[Masks, Refit]:
    """Choose the masks layer by layer while refitting (a sequential one-shot method such as SlimGPT,
    :mod:`pgprune.pruning.slimgpt`): layer i's KV groups are chosen by ``select`` on o_proj's full input, o_proj is
    refit, then its channels on down_proj's full input (after the refit attention), down_proj is refit, and the
    calibration blocks move on through the pruned, refit layer. Returns (masks, refit weights); the refit equals
    :func:`refit_weights` of those masks (the same inputs, the same solves)."""
    if not (isinstance(damp, (int, float)) and not isinstance(damp, bool) and damp >= 0 and damp < float("inf")):
        raise PgpruneError(f"damp={damp!r}; allowed: a finite number >= 0 (default 0.01)")
    masks = Masks.full(get_adapter(model).layout())
    refit, _, _ = _run(model, masks, calib_blocks, batch_size, progress, None, float(damp), select)
    return masks, refit


@torch.no_grad()
def refit_logits(model, masks: Masks, refit: Refit, input_ids: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """Logits [n, T, vocab] of the masked model whose kept o_proj/down_proj weights and biases are ``refit`` (what
    ``slice_model(*apply_refit(model, masks, refit))`` computes, without slicing): the computation that propagates
    the calibration blocks in :func:`refit_weights`."""
    _, mm, hs = _run(model, masks, input_ids, batch_size, False, refit, 0.0)
    head = mm.adapter.lm_head()
    return torch.cat([head(mm.adapter.final_norm(h)) for h in hs])


class RefitBiases(dict):
    """The compensation of a refit, in the form slicing takes: as a dict, the ``extra_bias`` = {layer: {"o_proj"|
    "down_proj": float32 [hidden]}} that :func:`pgprune.hf.slicing.slice_model` *adds* to the module's bias (zeros
    where it has none): the refit bias minus the module's own; and ``weights`` = {layer: {"o_proj"|"down_proj":
    [hidden, kept columns] in the model's dtype}}: the refit kept columns, which
    :func:`pgprune.hf.slicing.sliced_state_dict` takes instead of the source's. Slicing a refit therefore copies
    neither the model nor a layer it does not keep, and works on a streamed (offloaded) model."""

    def __init__(self, biases: dict, weights: dict):
        super().__init__(biases)
        self.weights = weights


@torch.no_grad()
def apply_refit(model, masks: Masks, refit: Refit) -> tuple:
    """(``model`` itself, :class:`RefitBiases`) such that ``pgprune.hf.slicing.slice_model(model, masks, extra)``
    is the refit pruned model (the refit weights checked against the masks' kept columns). ``model`` is left
    untouched and may be streamed: a layer is read only where its o_proj/down_proj has a bias of its own."""
    adapter = get_adapter(model)
    layout = adapter.layout()
    masks.validate(layout)
    biases: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[int, dict[str, torch.Tensor]] = {}
    for i in masks.kept_layer_indices():
        if i not in refit:
            raise PgpruneError(f"the refit weights have no entry for kept layer {i}")
        p = adapter.parts(i)
        if any(lin.bias is not None and lin.bias.is_meta for lin in (p.o_proj, p.down_proj)):
            p = layer_parts(model, i)  # a streamed layer: its own biases, read from its weights
        cols = kept_columns(layout, masks, i)
        biases[i], weights[i] = {}, {}
        for name, lin in (("o_proj", p.o_proj), ("down_proj", p.down_proj)):
            w, b32 = _checked(refit, i, name, lin, cols[name])
            weights[i][name] = w.to(lin.weight.dtype)
            biases[i][name] = _extra_bias(lin, b32)
    return model, RefitBiases(biases, weights)


def refit_model(model, masks: Masks, calib_blocks: torch.Tensor, *, damp: float = 0.01, batch_size: int = 8,
                progress: bool = True):
    """:func:`refit_weights` then :func:`apply_refit`: (``model``, :class:`RefitBiases` for
    ``slice_model(model, masks, extra)``)."""
    refit = refit_weights(model, masks, calib_blocks, damp=damp, batch_size=batch_size, progress=progress)
    return apply_refit(model, masks, refit)


def recording(select: Selector, sums: dict) -> Selector:
    """``select`` that also leaves the full-input sums of every call in ``sums`` ({(layer, module): (g float64
    [m+1, m+1] on the CPU, n tokens)}): the statistics a sequential selection saw, for :meth:`GramRefit.from_sums`."""

    def select_and_record(i: int, name: str, lin, g: torch.Tensor, n: int) -> torch.Tensor:
        sums[(i, name)] = (g.cpu(), n)
        return select(i, name, lin, g, n)

    return select_and_record


def following(masks: Masks) -> Selector:
    """The ``select`` that chooses exactly ``masks``' KV groups and channels (a sequential pass of given masks)."""

    def select(i: int, name: str, lin, g: torch.Tensor, n: int) -> torch.Tensor:
        return (masks.heads[i] if name == "o_proj" else masks.channels[i]).clone()

    return select


@torch.no_grad()
def reference_sums(model, calib_blocks: torch.Tensor, reference: Masks, *, damp: float = 0.01, batch_size: int = 8,
                   progress: bool = False) -> dict:
    """{(layer, module): (g, n)}: the full-input sums of o_proj and down_proj of every kept layer on the calibration
    stream of ``reference``'s pruned, refit model (the sequential inputs: one pass of :func:`select_and_refit`
    following the reference)."""
    layout = get_adapter(model).layout()
    reference.validate(layout)
    start = Masks.full(layout)
    start.layers = reference.layers.clone()
    sums: dict = {}
    _run(model, start, _check_blocks(calib_blocks), batch_size, progress, None, float(damp),
         recording(following(reference), sums))
    return sums


@torch.no_grad()
def dense_sums(model, calib_blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = False) -> dict:
    """{(layer, module): (g, n)}: the full-input sums g = sum z z^T, z = [x; 1] (float64 [m+1, m+1], CPU) of
    o_proj and down_proj of every layer on the calibration tokens of the dense model (one pass)."""
    sums: dict = {}

    def taps(i, name, x, *rest):
        if name not in MODULES:
            return
        _check_finite(x, i, name)
        z = torch.cat([x.reshape(-1, x.shape[-1]).double(),
                       torch.ones(x.numel() // x.shape[-1], 1, dtype=torch.float64, device=x.device)], dim=1)
        g, n = sums.get((i, name), (None, 0))
        if g is None:
            g = torch.zeros(z.shape[1], z.shape[1], dtype=torch.float64)
        g.addmm_(z.t().cpu(), z.cpu())  # [m+1, m+1]
        sums[(i, name)] = (g, n + z.shape[0])

    MaskedModel(model).scan(_check_blocks(calib_blocks), taps, batch_size=batch_size, progress=progress,
                            desc="refit grams")
    return sums


class GramRefit:
    """Refit weights of *any* kept set, from full-input Gram matrices cached once (the search's refit loss).

    For every layer i and module (o_proj, down_proj) the sums G = sum_t z_t z_t^T, z = [x; 1] over all n inputs of
    the module on the calibration tokens are accumulated once (float64 [n+1, n+1]); the refit of a kept set K then
    reads H = G[K+1, K+1] / N and C = G[S, K+1] / N and solves exactly as :func:`refit_weights` does (same damping
    rule). Difference from :func:`refit_weights`: the inputs are those of the **dense** model (one pass, no
    propagation through pruned and refit earlier layers), so a sampled mask costs one small solve per layer and
    module (cached per kept set: the widths policy's prefixes repeat) instead of a sequential pass. It is the
    search's approximation of the refit model's loss; the final masks get the sequential refit.

    With ``reference`` masks the sums are taken instead on the calibration stream of the **reference's pruned and
    refit model** (layer i's full inputs after layers 0..i-1 pruned by the reference and refit: the sequential
    inputs, one pass of :func:`select_and_refit`), so the refit of the reference itself is exact and masks near it
    are refit on nearly their own sequential inputs (the search started from SlimGPT's masks).

    Memory: (n+1)^2 float64 per module and layer (SmolLM2-135M: ~0.6 GB; a 7B model's down_proj Grams are ~1 GB per
    layer, so this is for small and mid-size models on CPU memory)."""

    def __init__(self, model, calib_blocks: torch.Tensor, *, damp: float = 0.01, batch_size: int = 8,
                 progress: bool = False, cache_size: int = 1024, reference: Masks | None = None):
        blocks = _check_blocks(calib_blocks)
        if reference is not None:
            sums = reference_sums(model, blocks, reference, damp=damp, batch_size=batch_size, progress=progress)
        else:
            sums = dense_sums(model, blocks, batch_size=batch_size, progress=progress)
        self._setup(model, sums, damp, cache_size)

    @classmethod
    def from_sums(cls, model, sums: dict, *, damp: float = 0.01, cache_size: int = 1024) -> "GramRefit":
        """The GramRefit of sums already taken: ``sums`` = {(layer, module): (g float64 [m+1, m+1], n tokens)} for
        every kept layer and both modules, e.g. those :func:`pgprune.pruning.slimgpt.slimgpt_masks` saw while
        choosing its masks, which are exactly :func:`reference_sums` of those masks (the same sequential pass), so
        the search's refit loss on SlimGPT's stream costs no second pass."""
        self = cls.__new__(cls)
        self._setup(model, sums, damp, cache_size)
        return self

    def _setup(self, model, sums: dict, damp: float, cache_size: int) -> None:
        import functools

        layers = {i for i, _ in sums}
        missing = [f"{i}.{name}" for i in sorted(layers) for name in MODULES if (i, name) not in sums]
        if not sums or missing:
            raise PgpruneError(f"GramRefit: the sums of {', '.join(missing) or 'every layer'} are missing; allowed: "
                               "the sums of both modules (o_proj, down_proj) of every kept layer")
        self.damp = float(damp)
        self.adapter = get_adapter(model)
        self.layout = self.adapter.layout()
        self._grams = {k: g for k, (g, _) in sums.items()}
        self._n = {k: n for k, (_, n) in sums.items()}
        self._cached = functools.lru_cache(maxsize=cache_size)(self._solve_cols)

    def _solve_cols(self, i: int, name: str, cols: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        lin = getattr(self.adapter.parts(i), name)
        g, n = self._grams[(i, name)], self._n[(i, name)]
        kept = torch.tensor(cols, dtype=torch.long)
        removed = _removed(lin.in_features, kept)
        view = _Gram.view(g, n, kept, removed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # per-sample solves: the final refit reports what matters
            w32, b32 = _solve(lin.weight.detach(), lin.bias, kept, removed, view, self.damp, f"layer {i} {name}")
        w = lin.weight
        return w32.to(w.device, w.dtype), b32.to(w.device, w.dtype)

    def weights(self, i: int, name: str, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W' [out, k], b' [out]) in the module's dtype and device for the kept input columns ``cols``."""
        return self._cached(i, name, tuple(int(c) for c in cols.tolist()))

    def digest(self) -> dict:
        """What identifies these refit weights (for a search's checkpoint key)."""
        import hashlib

        h = hashlib.sha256()
        for key in sorted(self._grams):
            h.update(self._grams[key].numpy().tobytes())
        return {"damp": self.damp, "grams": h.hexdigest()}
