"""Fused linear → log-softmax → gather (+ entropy): per-token log-probs without [N, V] logits.

    z_v     = x · w_v / τ                    hidden x (N, H), lm_head weight W (V, H), temperature τ
    lse     = log Σ_v exp z_v
    logp    = z_y − lse                      y: the target token
    entropy = lse − Σ_v p_v z_v              p = softmax(z)

Gradients, with upstream g_logp and g_ent per token (both outputs are differentiable):

    ∂logp/∂z_j    = 1[j = y] − p_j
    ∂entropy/∂z_j = −p_j (z_j − Σ_v p_v z_v) = −p_j (z_j − lse + entropy)
    dz_j          = g_logp (1[j = y] − p_j) − g_ent p_j (z_j − lse + entropy)

Σ p·z is never formed directly: with logits near −100 both lse and Σ p·z are large and
their difference cancels in fp32. The entropy is accumulated relative to the running
max m instead — S = Σ e^(z−m), T = Σ e^(z−m)(z−m), rescaled on a new max m' as
S' = e^(m−m')S, T' = e^(m−m')(T + (m−m')S) — so entropy = log S − T/S.
    dX = (dz / τ) W        dW = (dz / τ)ᵀ X

Three implementations with one API (`fused_logprobs`):
- `triton`: forward = one program per block of rows sweeping vocab tiles with an online
  max / sum-exp in fp32 (running max from −inf, padded vocab columns masked to −inf,
  the target logit and the entropy terms from the same tiles). Backward = one program per
  (row block, vocab tile): recompute the logit tile, form dz in registers, and add
  dz·W into dX and dzᵀ·X into dW with fp32 atomics. The vocabulary is processed in
  chunks so the fp32 dW accumulator is bounded (`_DW_CHUNK` rows of W), and the
  gradients are recomputed in the backward from the saved (lse, entropy) — never
  computed in the forward, where the upstream gradients are not known yet.
- `chunked`: the same math in PyTorch over blocks of rows: memory O(rows·V) per block
  instead of O(N·V); the CPU path and the fallback.
- `naive`: full logits, `log_softmax`, autograd — the reference for tests.

Dispatch (`impl=None`): Triton on CUDA, chunked elsewhere; `TAGPR_LOGPROB_IMPL`
overrides (set it to `triton` with `TRITON_INTERPRET=1` to run the kernels on a CPU).
Statistics are fp32 for fp32, bf16 and fp16 inputs; outputs are fp32. Targets must lie
in [0, V) (pass any valid id at positions you mask out). FLOPs: forward 2NHV,
forward + backward 8NHV (the backward recomputes the logits).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; keep the PyTorch paths usable without it
    triton = None

IMPLS = ("triton", "chunked", "naive")
_DW_CHUNK = 16384  # vocab rows of W per backward launch: bounds the fp32 dW buffer to 16384·H·4 bytes
_CHUNK_BYTES = 64 << 20  # chunked path: fp32 logits per block of rows


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ============================================================================ naive reference


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Full (N, V) logits in fp32; autograd does the backward. For tests and benchmarks."""
    z = (hidden @ weight.T).float() / temperature  # (N, V)
    logp_all = torch.log_softmax(z, dim=-1)  # (N, V)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (N,)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N,)
    return logp, entropy


# ============================================================================ chunked PyTorch


def _rows_per_chunk(n: int, v: int) -> int:
    return max(1, min(n, _CHUNK_BYTES // (4 * v)))


def _f32(x: torch.Tensor) -> torch.Tensor:
    """fp32 operands for the chunked path: half-precision logits would round z before the softmax."""
    return x if x.dtype == torch.float32 else x.float()


def _chunked_forward(h, w, tgt, inv_t):
    n = h.shape[0]
    w = _f32(w)
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    ent, lse = torch.empty_like(logp), torch.empty_like(logp)
    step = _rows_per_chunk(n, w.shape[0])
    for a in range(0, n, step):
        b = min(n, a + step)
        z = (_f32(h[a:b]) @ w.T).mul_(inv_t)  # (n_c, V) fp32
        norm = torch.logsumexp(z, dim=1)  # (n_c,)
        z.sub_(norm[:, None])  # (n_c, V) log-probs, in place
        lse[a:b] = norm
        ent[a:b] = -torch.linalg.vecdot(z.exp(), z)  # −Σ p·log p, no cancellation
        logp[a:b] = z.gather(1, tgt[a:b, None]).squeeze(1)
    return logp, ent, lse


def _chunked_backward(h, w, tgt, inv_t, lse, ent, g_logp, g_ent, need_dh, need_dw):
    n = h.shape[0]
    w32 = _f32(w)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_dw else None  # fp32 accumulation
    step = _rows_per_chunk(n, w.shape[0])
    for a in range(0, n, step):
        b = min(n, a + step)
        h32 = _f32(h[a:b])  # (n_c, H)
        z = (h32 @ w32.T).mul_(inv_t).sub_(lse[a:b, None])  # (n_c, V) recomputed z − lse
        p = z.exp()  # (n_c, V)
        # dz = −p·(g_logp + g_ent·(z − lse + H)), then + g_logp at the target; in place in z's buffer
        dz = z.add_(ent[a:b, None]).mul_(g_ent[a:b, None]).add_(g_logp[a:b, None]).mul_(p).neg_()
        dz.scatter_add_(1, tgt[a:b, None], g_logp[a:b, None])
        dz.mul_(inv_t)  # ∂/∂(x·w) = ∂/∂z · 1/τ
        if need_dh:
            dh[a:b] = (dz @ w32).to(h.dtype)  # (n_c, H)
        if need_dw:
            dw.addmm_(dz.T, h32)  # (V, H) fp32
    return dh, (dw.to(w.dtype) if need_dw else None)


# ============================================================================ Triton

if triton is not None:

    @triton.jit
    def _load_xw(
        h_ptr,
        w_ptr,
        rows64,
        row_ok,
        cols64,
        col_ok,
        hk,
        hk_ok,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        UPCAST: tl.constexpr,
    ):
        """The (BLOCK_N, BLOCK_H) tile of X and the (BLOCK_V, BLOCK_H) tile of W; zeros outside."""
        x = tl.load(
            h_ptr + rows64[:, None] * stride_hn + hk[None, :] * stride_hh,
            mask=row_ok[:, None] & hk_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + cols64[:, None] * stride_wv + hk[None, :] * stride_wh,
            mask=col_ok[:, None] & hk_ok[None, :],
            other=0.0,
        )
        if UPCAST:  # the interpreter's bf16 dot is broken: do it in fp32
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        return x, w

    @triton.jit
    def _logit_tile(
        h_ptr,
        w_ptr,
        rows64,
        row_ok,
        cols64,
        col_ok,
        H,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        """x·wᵀ for a (BLOCK_N, BLOCK_V) tile, accumulated over H in fp32."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            x, w = _load_xw(
                h_ptr,
                w_ptr,
                rows64,
                row_ok,
                cols64,
                col_ok,
                hk,
                hk < H,
                stride_hn,
                stride_hh,
                stride_wv,
                stride_wh,
                UPCAST,
            )
            if IEEE:  # fp32 inputs: full-precision dot, not TF32
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        return acc

    @triton.jit
    def _fwd_kernel(
        h_ptr,
        w_ptr,
        tgt_ptr,
        logp_ptr,
        ent_ptr,
        lse_ptr,
        N,
        V,
        H,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        inv_temp,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # 1. this program's rows; int64 offsets (N·H and V·H overflow int32 at LLM sizes)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=0)
        # 2. running statistics in fp32: max from −inf, S = Σ e^(z−m), T = Σ e^(z−m)·(z−m), the target logit
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        t = tl.zeros([BLOCK_N], dtype=tl.float32)
        z_tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            # 3. the logit tile, temperature applied, padded vocab columns at −inf
            z = (
                _logit_tile(
                    h_ptr,
                    w_ptr,
                    rows64,
                    row_ok,
                    cols.to(tl.int64),
                    col_ok,
                    H,
                    stride_hn,
                    stride_hh,
                    stride_wv,
                    stride_wh,
                    BLOCK_N,
                    BLOCK_V,
                    BLOCK_H,
                    UPCAST,
                    IEEE,
                )
                * inv_temp
            )
            z = tl.where(col_ok[None, :], z, float("-inf"))
            # 4. online update, relative to the running max so the entropy never cancels;
            #    the first tile's shift is 0, not −inf·0; padded columns get u = 0 and e = 0
            #    (never 0·(−inf), which is NaN)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            scale = tl.exp(m - m_new)
            shift = tl.where(m == float("-inf"), 0.0, m - m_new)
            u = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
            e = tl.where(col_ok[None, :], tl.exp(u), 0.0)
            t = scale * (t + shift * s) + tl.sum(e * u, axis=1)
            s = s * scale + tl.sum(e, axis=1)
            m = m_new
            z_tgt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        # 5. lse = m + log S, entropy = log S − T/S
        lse = m + tl.log(s)
        tl.store(logp_ptr + rows64, z_tgt - lse, mask=row_ok)
        tl.store(ent_ptr + rows64, tl.log(s) - t / s, mask=row_ok)
        tl.store(lse_ptr + rows64, lse, mask=row_ok)

    @triton.jit
    def _bwd_kernel(
        h_ptr,
        w_ptr,
        tgt_ptr,
        lse_ptr,
        ent_ptr,
        g_logp_ptr,
        g_ent_ptr,
        dh_ptr,
        dw_ptr,
        N,
        H,
        v_start,
        v_end,
        stride_hn,
        stride_hh,
        stride_wv,
        stride_wh,
        stride_dhn,
        stride_dhh,
        stride_dwv,
        stride_dwh,
        inv_temp,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        UPCAST: tl.constexpr,
        IEEE: tl.constexpr,
        NEED_DH: tl.constexpr,
        NEED_DW: tl.constexpr,
    ):
        # 1. this program's (row block, vocab tile) within the chunk [v_start, v_end)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        cols = v_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        cols64 = cols.to(tl.int64)
        # 2. recompute the logit tile
        z = (
            _logit_tile(
                h_ptr,
                w_ptr,
                rows64,
                row_ok,
                cols64,
                col_ok,
                H,
                stride_hn,
                stride_hh,
                stride_wv,
                stride_wh,
                BLOCK_N,
                BLOCK_V,
                BLOCK_H,
                UPCAST,
                IEEE,
            )
            * inv_temp
        )
        lse = tl.load(lse_ptr + rows64, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows64, mask=row_ok, other=0.0)
        g_logp = tl.load(g_logp_ptr + rows64, mask=row_ok, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows64, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + rows64, mask=row_ok, other=-1)
        # 3. dz = g_logp·(onehot − p) − g_ent·p·(z − lse + H), zero outside the valid tile; · 1/τ
        ok = row_ok[:, None] & col_ok[None, :]
        zl = z - lse[:, None]
        p = tl.where(ok, tl.exp(zl), 0.0)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        dz = g_logp[:, None] * (onehot - p) - g_ent[:, None] * p * (zl + ent[:, None])
        dz = tl.where(ok, dz, 0.0) * inv_temp
        # 4. dX[rows] += dz·W[cols] and dW[cols] += dzᵀ·X[rows], one H block at a time, fp32 atomics
        for h0 in range(0, H, BLOCK_H):
            hk = h0 + tl.arange(0, BLOCK_H)
            hk_ok = hk < H
            x, w = _load_xw(
                h_ptr,
                w_ptr,
                rows64,
                row_ok,
                cols64,
                col_ok,
                hk,
                hk_ok,
                stride_hn,
                stride_hh,
                stride_wv,
                stride_wh,
                UPCAST,
            )
            dz_in = dz.to(x.dtype)  # the tensor cores' input type (bf16 on GPU); fp32 when upcast
            if NEED_DH:
                if IEEE:
                    d_h = tl.dot(dz_in, w, input_precision="ieee")
                else:
                    d_h = tl.dot(dz_in, w)
                tl.atomic_add(
                    dh_ptr + rows64[:, None] * stride_dhn + hk[None, :] * stride_dhh,
                    d_h,
                    mask=row_ok[:, None] & hk_ok[None, :],
                )
            if NEED_DW:
                if IEEE:
                    d_w = tl.dot(tl.trans(dz_in), x, input_precision="ieee")
                else:
                    d_w = tl.dot(tl.trans(dz_in), x)
                local = (cols64 - v_start)[:, None]
                tl.atomic_add(
                    dw_ptr + local * stride_dwv + hk[None, :] * stride_dwh, d_w, mask=col_ok[:, None] & hk_ok[None, :]
                )


def _blocks(n: int, h: int):
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    block_h = max(16, min(64, triton.next_power_of_2(h)))
    return block_n, 128, block_h


def _triton_forward(h, w, tgt, inv_t):
    n, hd = h.shape
    v = w.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=h.device)
    ent, lse = torch.empty_like(logp), torch.empty_like(logp)
    bn, bv, bh = _blocks(n, hd)
    _fwd_kernel[(triton.cdiv(n, bn),)](
        h,
        w,
        tgt,
        logp,
        ent,
        lse,
        n,
        v,
        hd,
        h.stride(0),
        h.stride(1),
        w.stride(0),
        w.stride(1),
        inv_t,
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_H=bh,
        UPCAST=_interpreting(),
        IEEE=h.dtype == torch.float32,
    )
    return logp, ent, lse


def _triton_backward(h, w, tgt, inv_t, lse, ent, g_logp, g_ent, need_dh, need_dw):
    n, hd = h.shape
    v = w.shape[0]
    bn, bv, bh = _blocks(n, hd)
    dh32 = torch.zeros((n, hd), dtype=torch.float32, device=h.device)
    dw = torch.empty_like(w) if need_dw else None
    for v0 in range(0, v, _DW_CHUNK):
        v1 = min(v, v0 + _DW_CHUNK)
        # fp32 accumulator for this chunk of W's rows (the gradient itself when W is fp32)
        dw32 = (
            (
                dw[v0:v1]
                if w.dtype == torch.float32
                else torch.empty((v1 - v0, hd), dtype=torch.float32, device=w.device)
            )
            if need_dw
            else dh32
        )
        if need_dw:
            dw32.zero_()
        _bwd_kernel[(triton.cdiv(n, bn), triton.cdiv(v1 - v0, bv))](
            h,
            w,
            tgt,
            lse,
            ent,
            g_logp,
            g_ent,
            dh32,
            dw32,
            n,
            hd,
            v0,
            v1,
            h.stride(0),
            h.stride(1),
            w.stride(0),
            w.stride(1),
            dh32.stride(0),
            dh32.stride(1),
            dw32.stride(0),
            dw32.stride(1),
            inv_t,
            BLOCK_N=bn,
            BLOCK_V=bv,
            BLOCK_H=bh,
            UPCAST=_interpreting(),
            IEEE=h.dtype == torch.float32,
            NEED_DH=need_dh,
            NEED_DW=need_dw,
        )
        if need_dw and w.dtype != torch.float32:
            dw[v0:v1] = dw32.to(w.dtype)
    return (dh32.to(h.dtype) if need_dh else None), dw


# ============================================================================ autograd and dispatch

_FORWARD = {"chunked": _chunked_forward, "triton": _triton_forward}
_BACKWARD = {"chunked": _chunked_backward, "triton": _triton_backward}


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, impl):
        inv_t = 1.0 / float(temperature)  # a Python float, so kernels see an fp32 scalar, never fp64
        logp, ent, lse = _FORWARD[impl](hidden, weight, targets, inv_t)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_t, ctx.impl = inv_t, impl
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        zeros = torch.zeros_like(lse)
        # upstream gradients may be missing (an unused output) or non-contiguous (a slice of a larger graph)
        g_logp = zeros if g_logp is None else g_logp.float().contiguous()
        g_ent = zeros if g_ent is None else g_ent.float().contiguous()
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # `.backward()` may be called inside autocast
            dh, dw = _BACKWARD[ctx.impl](hidden, weight, targets, ctx.inv_t, lse, ent, g_logp, g_ent, need_dh, need_dw)
        return dh, dw, None, None, None


def default_impl(device: torch.device) -> str:
    env = os.environ.get("TAGPR_LOGPROB_IMPL")
    if env:
        if env not in IMPLS:
            raise ValueError(f"TAGPR_LOGPROB_IMPL={env!r}; expected one of {IMPLS}")
        return env
    return "triton" if device.type == "cuda" and triton is not None else "chunked"


def fused_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, impl: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of `targets` under softmax(hidden·Wᵀ/τ).

    hidden (*, H), weight (V, H), targets (*) int in [0, V) → logp (*), entropy (*), fp32.
    Differentiable w.r.t. hidden and weight, for upstream gradients on both outputs.
    """
    impl = impl or default_impl(hidden.device)
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).long()
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if impl == "naive":
        logp, ent = naive_logprobs(h, weight, t, temperature)
    else:
        if impl == "triton" and triton is None:
            raise RuntimeError("impl='triton' needs the triton package")
        if h.shape[0] == 0:  # no rows (a rank's empty micro-batch): the chunked path's loops simply do not run
            impl = "chunked"
        with torch.autocast(h.device.type, enabled=False):  # fp32 logits even inside a bf16 autocast region
            logp, ent = _FusedLogprobs.apply(
                h.contiguous(), weight.contiguous(), t.contiguous(), float(temperature), impl
            )
    return logp.view(lead), ent.view(lead)
