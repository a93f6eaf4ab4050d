"""Triton kernels of the fused path (imported only on first use; needs Triton and CUDA).

A parameter group is a list of *segments* (parameter tensors), each cut into *chunks* of
``CHUNK`` elements; one program handles one chunk in blocks of ``BLOCK``. Tensors are addressed
as a base tensor plus a per-segment element offset (so the compiler knows the alignment and loads
16 bytes at a time); a chunk that is full runs unmasked. Per step::

    dots_kernel        per-chunk partial dot products          (the reduction pass)
    layer_sum_kernel   per-layer sums of the partials (deterministic, no atomics)
    finish_kernel      one program: R_k, the per-layer coefficients, the skip rule, the guard,
                       the shared P's posterior, the counters, the step code
    apply_kernel       the element-wise pass, chunks in reverse order (what the reduction pass
                       read last is still in L2)

Scalars come in as (hi, lo) float32 pairs so that float64 state gets its hyper-parameters exactly.
"""

from __future__ import annotations

import triton
import triton.language as tl

PRODUCT, DIAGONAL, SCALAR, BLOCK_2X2 = 0, 1, 2, 3


@triton.jit
def _ld(ptr, idx, m, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=m, other=0.0)
    else:
        return tl.load(ptr + idx)


@triton.jit
def _st(ptr, idx, value, m, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, value, mask=m)
    else:
        tl.store(ptr + idx, value)


@triton.jit
def _pair(hi, lo, DT: tl.constexpr):
    """A scalar given as a float32 pair, in precision DT."""
    return tl.cast(hi, DT) + tl.cast(lo, DT)


@triton.jit
def _seg_ptr(base, off_table, seg, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    off = tl.load(off_table + seg)
    if ALIGNED:
        off = tl.multiple_of(off, VEC)
    return base + off


@triton.jit
def _dots_blocks(g_ptr, p_ptr, s0_ptr, s1_ptr, start, end, nblk, wd, acc_hh, acc_gg, acc_tt, acc_a, acc_b,
                 acc_c, acc_d, acc_bad, MODE: tl.constexpr, HAS_WD: tl.constexpr, MASKED: tl.constexpr,
                 S_DT: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for k in range(0, nblk):
        idx = start + k * BLOCK + lanes
        m = idx < end
        g = _ld(g_ptr, idx, m, MASKED).to(S_DT)
        acc_bad += g * 0.0  # NaN where g is not finite
        if HAS_WD:
            th = _ld(p_ptr, idx, m, MASKED).to(S_DT)
            H = g + wd * th
            acc_gg += g * g
            acc_tt += th * th
        else:
            H = g
        acc_hh += H * H
        if MODE == 0:
            vp = _ld(s0_ptr, idx, m, MASKED)
            hp = _ld(s1_ptr, idx, m, MASKED)
            acc_a += H * hp
            acc_b += H * vp
            acc_c += hp * hp
            acc_d += hp * vp
        elif MODE == 1:
            p = _ld(s0_ptr, idx, m, MASKED)
            acc_a += p * H * H
    return acc_hh, acc_gg, acc_tt, acc_a, acc_b, acc_c, acc_d, acc_bad


@triton.jit
def dots_kernel(chunk_seg, chunk_start, seg_numel, p_base, p_off, g_base, g_off, s0_base, s0_off, s1_base,
                s1_off, partials, wd_hi, wd_lo, MODE: tl.constexpr, HAS_WD: tl.constexpr,
                ALIGNED: tl.constexpr, VEC_P: tl.constexpr, VEC_S: tl.constexpr, S_DT: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(chunk_seg + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
    n = tl.load(seg_numel + seg)
    end = tl.minimum(start + CHUNK, n)
    g_ptr = _seg_ptr(g_base, g_off, seg, VEC_P, ALIGNED)
    p_ptr = _seg_ptr(p_base, p_off, seg, VEC_P, ALIGNED)
    s0_ptr = _seg_ptr(s0_base, s0_off, seg, VEC_S, ALIGNED)
    s1_ptr = _seg_ptr(s1_base, s1_off, seg, VEC_S, ALIGNED)
    wd = _pair(wd_hi, wd_lo, S_DT)
    acc_hh = tl.zeros([BLOCK], dtype=S_DT)
    acc_gg = tl.zeros([BLOCK], dtype=S_DT)
    acc_tt = tl.zeros([BLOCK], dtype=S_DT)
    acc_a = tl.zeros([BLOCK], dtype=S_DT)
    acc_b = tl.zeros([BLOCK], dtype=S_DT)
    acc_c = tl.zeros([BLOCK], dtype=S_DT)
    acc_d = tl.zeros([BLOCK], dtype=S_DT)
    acc_bad = tl.zeros([BLOCK], dtype=S_DT)
    if end - start == CHUNK:
        acc_hh, acc_gg, acc_tt, acc_a, acc_b, acc_c, acc_d, acc_bad = _dots_blocks(
            g_ptr, p_ptr, s0_ptr, s1_ptr, start, end, CHUNK // BLOCK, wd, acc_hh, acc_gg, acc_tt, acc_a, acc_b,
            acc_c, acc_d, acc_bad, MODE, HAS_WD, False, S_DT, BLOCK)
    else:
        acc_hh, acc_gg, acc_tt, acc_a, acc_b, acc_c, acc_d, acc_bad = _dots_blocks(
            g_ptr, p_ptr, s0_ptr, s1_ptr, start, end, tl.cdiv(end - start, BLOCK), wd, acc_hh, acc_gg, acc_tt,
            acc_a, acc_b, acc_c, acc_d, acc_bad, MODE, HAS_WD, True, S_DT, BLOCK)
    hh = tl.sum(acc_hh, 0)
    out = partials + pid * 8
    tl.store(out + 0, hh)
    if HAS_WD:
        tl.store(out + 1, tl.sum(acc_gg, 0))
    else:
        tl.store(out + 1, hh)
    tl.store(out + 2, tl.sum(acc_tt, 0))
    tl.store(out + 3, tl.sum(acc_a, 0))
    tl.store(out + 4, tl.sum(acc_b, 0))
    tl.store(out + 5, tl.sum(acc_c, 0))
    tl.store(out + 6, tl.sum(acc_d, 0))
    tl.store(out + 7, tl.sum(acc_bad, 0))


@triton.jit
def layer_sum_kernel(partials, layer_first, layer_last, dots, ROWS: tl.constexpr):
    layer = tl.program_id(0)
    first = tl.load(layer_first + layer)
    last = tl.load(layer_last + layer)
    cols = tl.arange(0, 8)
    acc = tl.zeros([ROWS, 8], dtype=partials.dtype.element_ty)
    for r in range(first, last, ROWS):
        rows = r + tl.arange(0, ROWS)
        acc += tl.load(partials + rows[:, None] * 8 + cols[None, :], mask=(rows < last)[:, None], other=0.0)
    tl.store(dots + layer * 8 + cols, tl.sum(acc, 0))


@triton.jit
def _finite(x):
    return (x - x) == 0


@triton.jit
def finish_kernel(dots, n_layers, S_all, P, R_ptr, R_floor_ptr, loss_ptr, stat_ptr, code_in, code_out, kinds_ptr,
                  steps_ptr, nonfinite_ptr, coef, skip_out, skipped_ptr, restarts_ptr, n_none, sigma_hi, sigma_lo,
                  q_hi, q_lo, lr_hi, lr_lo, wd_hi, wd_lo, r_hi, r_lo, alpha_hi, alpha_lo, MODE: tl.constexpr,
                  SYMMETRIC: tl.constexpr, GUARD: tl.constexpr, ONLINE_R: tl.constexpr, HAS_STAT: tl.constexpr,
                  COUNT: tl.constexpr, PREDICT_Q: tl.constexpr, S_DT: tl.constexpr, BLOCK_L: tl.constexpr):
    sigma = _pair(sigma_hi, sigma_lo, S_DT)
    q = _pair(q_hi, q_lo, S_DT)
    lr = _pair(lr_hi, lr_lo, S_DT)
    wd = _pair(wd_hi, wd_lo, S_DT)
    one = tl.full([BLOCK_L], 1.0, S_DT)
    zero = tl.zeros([BLOCK_L], S_DT)
    half = one / 2.0
    guard_eps = one / 1000000.0
    skip_norm = one / 1000000000.0
    code = tl.load(code_in)
    loss = tl.load(loss_ptr).to(S_DT)
    # a loss or statistic that is not finite skips the step (bits 1 and 2)
    code = code | tl.where(_finite(loss), 0, 1)
    if HAS_STAT:
        code = code | tl.where(_finite(tl.load(stat_ptr).to(S_DT)), 0, 2)
    # gradients that are not finite (NaN in the last dot column) skip the step
    bad = tl.sum(tl.zeros([BLOCK_L], tl.int32), 0)
    for l0 in range(0, n_layers, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        m = ls < n_layers
        x = tl.load(dots + ls * 8 + 7, mask=m, other=0.0)
        bad += tl.sum(tl.where(x == 0.0, 0, 1), 0)
    code = code | tl.where(bad > 0, 4, 0)
    ok = (code & 7) == 0
    R_old = tl.load(R_ptr)
    # R_k ≥ the smallest normal number (so S_k ≥ R_k > 0); a statistic below 0 counts as 0
    R_floor = tl.load(R_floor_ptr)
    if ONLINE_R:
        alpha = _pair(alpha_hi, alpha_lo, S_DT)
        s = tl.maximum(tl.load(stat_ptr).to(S_DT), 0.0)
        R = tl.where(ok, tl.maximum(alpha * R_old + (1.0 - alpha) * s, R_floor), R_old)
    else:
        R = tl.maximum(_pair(r_hi, r_lo, S_DT), R_floor)
    if MODE == 2:
        p00 = tl.load(P)
        p10 = p00
    elif MODE == 3:
        p00 = tl.load(P)
        p10 = tl.load(P + 2)
    n_skip = tl.sum(tl.zeros([BLOCK_L], tl.int32), 0)
    n_restart = tl.sum(tl.zeros([BLOCK_L], tl.int32), 0)
    n_overflow = tl.sum(tl.zeros([BLOCK_L], tl.int32), 0)
    ratio_max = tl.max(tl.full([BLOCK_L], float("-inf"), S_DT), 0)
    for l0 in range(0, n_layers, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        m = ls < n_layers
        row = dots + ls * 8
        hh = tl.load(row + 0, mask=m, other=1.0)
        gg = tl.load(row + 1, mask=m, other=1.0)
        tt = tl.load(row + 2, mask=m, other=0.0)
        # L_ℓ = L_k + ½ wd ‖θ_ℓ‖²
        L = loss + half * wd * tt
        small = (tl.sqrt(gg) >= skip_norm) == 0
        overflow = (small == 0) & ((_finite(hh) & _finite(L)) == 0)
        skip = small | overflow | (ok == 0)
        if GUARD:
            step = lr * tl.maximum(L, zero)
        else:
            step = lr * L
        if MODE == 0:
            hhp = tl.load(row + 3, mask=m, other=0.0)
            hvp = tl.load(row + 4, mask=m, other=0.0)
            x = tl.load(row + 5, mask=m, other=1.0)
            y = tl.load(row + 6, mask=m, other=0.0)
            S_prev = tl.load(S_all + ls, mask=m, other=1.0)
            first = S_prev == 0.0
            hhp = tl.where(first, hh, hhp)
            hvp = tl.where(first, sigma * hh, hvp)
            x = tl.where(first, hh, x)
            y = tl.where(first, sigma * hh, y)
            S_before = tl.where(first, sigma * hh + q * hh + R, S_prev)
            lam = (hvp + q * hhp) / S_before
            alpha_k = hhp / x
            if SYMMETRIC:
                w = hvp / x - (y / x) * (hhp / x)
            else:
                w = zero
            a = alpha_k - lam
            b = zero + q
            c = w - q * lam
            S = a * hvp + b * hh + c * hhp + q * hh + R
            b = tl.where(first, a * sigma + b + c, b)
            a = tl.where(first, zero, a)
            c = tl.where(first, zero, c)
            if GUARD:
                restart = (_finite(S) == 0) | (S <= guard_eps * R)
                S0 = sigma * hh + q * hh + R
                lam0 = (sigma * hh + q * hh) / S0
                b0 = (one - lam0) * sigma + q * (one - lam0)
                S_restart = b0 * hh + q * hh + R
                a = tl.where(restart, zero, a)
                b = tl.where(restart, b0, b)
                c = tl.where(restart, zero, c)
                S = tl.where(restart, S_restart, S)
                restart = restart & (skip == 0)
                n_restart += tl.sum(tl.where(restart & m, 1, 0), 0)
                # where even the restart gives no usable S_k, the layer is skipped unchanged
                skip = skip | (restart & ((_finite(S_restart) == 0) | (S_restart <= guard_eps * R)))
            d = tl.where(skip, zero, step / S)
            a = tl.where(skip, one, a)
            b = tl.where(skip, zero, b)
            c = tl.where(skip, zero, c)
            tl.store(S_all + ls, S, mask=m & (skip == 0))
        elif MODE == 1:
            # S = Σ p H² + q Σ H² + R
            S = tl.load(row + 3, mask=m, other=0.0) + q * hh + R
            a = tl.where(skip, zero, zero + q)
            b = tl.where(skip, zero + float("inf"), S)
            c = tl.where(skip, zero, step / S)
            d = zero
        else:
            S = p00 * hh + R
            scale = tl.where(skip, zero, step / S)
            a = scale * p00
            b = scale * p10
            if MODE == 3:
                # w̄ ← c w̄ + d θ: (0.9, 0.1) where updated, (1, 0) where skipped
                c = tl.where(skip, one, one * 9.0 / 10.0)
                d = tl.where(skip, zero, one / 10.0)
            else:
                c = zero
                d = zero
            if MODE == 2:
                # P ‖H_ℓ‖² / S_ℓ (an overflowing S_ℓ counts as 1)
                ratio = p00 * hh / S
                ratio = tl.where(ratio == ratio, ratio, 1.0)
            else:
                ratio = hh / S
            ratio_max = tl.maximum(ratio_max, tl.max(tl.where(skip | (m == 0), float("-inf"), ratio), 0))
        out = coef + ls * 4
        tl.store(out + 0, a, mask=m)
        tl.store(out + 1, b, mask=m)
        tl.store(out + 2, c, mask=m)
        tl.store(out + 3, d, mask=m)
        tl.store(skip_out + ls, tl.where(skip, 1, 0), mask=m)
        n_skip += tl.sum(tl.where(skip & m, 1, 0), 0)
        n_overflow += tl.sum(tl.where(overflow & m, 1, 0), 0)
    if MODE == 2:
        # P ← P − P² max_ℓ ‖H_ℓ‖² / S_ℓ  (over the updated layers), as P (1 − max_ℓ P ‖H_ℓ‖² / S_ℓ) ≥ 0
        P_post = tl.where(ratio_max > float("-inf"), p00 * tl.maximum(1.0 - ratio_max, 0.0), p00)
        if PREDICT_Q:
            # the next step's predict, P̂ = P + q (the step API runs it right after the update)
            P_post = tl.where(ok, P_post + q, P_post)
        tl.store(P, P_post)
    elif MODE == 3:
        # P ← P − E₀₀ P[:, 0] P[:, 0]ᵀ
        apply = ratio_max > float("-inf")
        p01 = tl.load(P + 1)
        p11 = tl.load(P + 3)
        tl.store(P, tl.where(apply, p00 - ratio_max * p00 * p00, p00))
        tl.store(P + 1, tl.where(apply, p01 - ratio_max * p00 * p10, p01))
        tl.store(P + 2, tl.where(apply, p10 - ratio_max * p10 * p00, p10))
        tl.store(P + 3, tl.where(apply, p11 - ratio_max * p10 * p10, p11))
    if ONLINE_R:
        tl.store(R_ptr, R)
    okc = tl.where(ok, 1, 0)
    tl.store(skipped_ptr, tl.load(skipped_ptr) + okc * (n_skip + n_none))
    tl.store(restarts_ptr, tl.load(restarts_ptr) + okc * n_restart)
    info = tl.where(n_overflow > 0, 16, 0)
    if GUARD:
        info = info | tl.where(loss < 0.0, 8, 0)
    code = code | (info * okc)
    tl.store(code_out, code)
    if COUNT:
        tl.store(steps_ptr, tl.load(steps_ptr) + okc)
        tl.store(nonfinite_ptr, tl.load(nonfinite_ptr) + (1 - okc))
        tl.store(kinds_ptr, tl.load(kinds_ptr) | code)


@triton.jit
def _apply_blocks(g_ptr, p_ptr, s0_ptr, s1_ptr, start, end, nblk, wd, q, a, c0, c1, c2, c3, acc, MODE: tl.constexpr,
                  HAS_WD: tl.constexpr, ALONG_G: tl.constexpr, FUSE_PREDICT: tl.constexpr, MASKED: tl.constexpr,
                  S_DT: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for k in range(0, nblk):
        idx = start + k * BLOCK + lanes
        m = idx < end
        g = _ld(g_ptr, idx, m, MASKED).to(S_DT)
        th = _ld(p_ptr, idx, m, MASKED).to(S_DT)
        if HAS_WD:
            H = g + wd * th
        else:
            H = g
        if MODE == 0:
            # v_k = a v_{k-1} + b H_k + c H_{k-1};  θ_k = θ_{k-1} − d (v_k + Q H_k);  store H_k
            vp = _ld(s0_ptr, idx, m, MASKED)
            hp = _ld(s1_ptr, idx, m, MASKED)
            v = c0 * vp + c1 * H + c2 * hp
            th_new = th - c3 * (v + q * H)
            _st(s0_ptr, idx, v, m, MASKED)
            _st(s1_ptr, idx, H, m, MASKED)
        elif MODE == 1:
            # p̂ = p + q;  θ ← θ − (η L / S) p̂ H;  p ← p̂ − (p̂ H)² / S  (as p̂ (1 − (p̂ H / S) H))
            p = _ld(s0_ptr, idx, m, MASKED)
            p_hat = p + c0
            pH = p_hat * H
            th_new = th - c2 * pH
            # p ← p̂ (1 − (p̂ H / S) H), the factor clamped at 0  (c1 = S)
            _st(s0_ptr, idx, p_hat * tl.maximum(1.0 - (pH / c1) * H, 0.0), m, MASKED)
        elif MODE == 2:
            if ALONG_G:
                th_new = th - c0 * g
            else:
                th_new = th - c0 * H
        else:
            # θ ← θ − η L (P₀₀/S) H;  u ← u − η L (P₁₀/S) H;  w̄ ← 0.9 w̄ + 0.1 θ
            u = _ld(s0_ptr, idx, m, MASKED)
            wb = _ld(s1_ptr, idx, m, MASKED)
            th_new = th - c0 * H
            u_new = u - c1 * H
            wb_new = c2 * wb + c3 * th_new
            if FUSE_PREDICT:
                # the next step's predict: ‖w̄ − θ‖² (θ as stored), θ ← θ + u, u ← a u
                th_stored = th_new.to(p_ptr.dtype.element_ty).to(S_DT)
                diff = wb_new - th_stored
                acc += diff * diff
                th_new = th_stored + u_new
                u_new = a * u_new
            _st(s0_ptr, idx, u_new, m, MASKED)
            _st(s1_ptr, idx, wb_new, m, MASKED)
        _st(p_ptr, idx, th_new.to(p_ptr.dtype.element_ty), m, MASKED)
    return acc


@triton.jit
def apply_kernel(chunk_seg, chunk_start, seg_numel, seg_layer, p_base, p_off, g_base, g_off, s0_base, s0_off,
                 s1_base, s1_off, coef, skip, n_chunks, wd_hi, wd_lo, q_hi, q_lo, partials, code_ptr, a_hi, a_lo,
                 MODE: tl.constexpr, HAS_WD: tl.constexpr, ALONG_G: tl.constexpr, FUSE_PREDICT: tl.constexpr,
                 ALIGNED: tl.constexpr, VEC_P: tl.constexpr, VEC_S: tl.constexpr, S_DT: tl.constexpr,
                 CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = n_chunks - 1 - tl.program_id(0)
    seg = tl.load(chunk_seg + pid)
    layer = tl.load(seg_layer + seg)
    acc = tl.zeros([BLOCK], dtype=S_DT)
    if FUSE_PREDICT:  # a skipped layer still predicts; a skipped step changes nothing
        run = tl.where((tl.load(code_ptr) & 7) == 0, 1, 0)
    else:
        run = tl.where(tl.load(skip + layer) == 0, 1, 0)
    if run == 1:
        start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
        n = tl.load(seg_numel + seg)
        end = tl.minimum(start + CHUNK, n)
        g_ptr = _seg_ptr(g_base, g_off, seg, VEC_P, ALIGNED)
        p_ptr = _seg_ptr(p_base, p_off, seg, VEC_P, ALIGNED)
        s0_ptr = _seg_ptr(s0_base, s0_off, seg, VEC_S, ALIGNED)
        s1_ptr = _seg_ptr(s1_base, s1_off, seg, VEC_S, ALIGNED)
        wd = _pair(wd_hi, wd_lo, S_DT)
        q = _pair(q_hi, q_lo, S_DT)
        a = _pair(a_hi, a_lo, S_DT)
        c0 = tl.load(coef + layer * 4 + 0)
        c1 = tl.load(coef + layer * 4 + 1)
        c2 = tl.load(coef + layer * 4 + 2)
        c3 = tl.load(coef + layer * 4 + 3)
        if end - start == CHUNK:
            acc = _apply_blocks(g_ptr, p_ptr, s0_ptr, s1_ptr, start, end, CHUNK // BLOCK, wd, q, a, c0, c1, c2, c3,
                                acc, MODE, HAS_WD, ALONG_G, FUSE_PREDICT, False, S_DT, BLOCK)
        else:
            acc = _apply_blocks(g_ptr, p_ptr, s0_ptr, s1_ptr, start, end, tl.cdiv(end - start, BLOCK), wd, q, a, c0,
                                c1, c2, c3, acc, MODE, HAS_WD, ALONG_G, FUSE_PREDICT, True, S_DT, BLOCK)
    if FUSE_PREDICT:
        tl.store(partials + pid * 8, tl.sum(acc, 0))


@triton.jit
def _predict_blocks(p_ptr, s0_ptr, s1_ptr, start, end, nblk, a, acc, MASKED: tl.constexpr, S_DT: tl.constexpr,
                    BLOCK: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    for k in range(0, nblk):
        idx = start + k * BLOCK + lanes
        m = idx < end
        th = _ld(p_ptr, idx, m, MASKED).to(S_DT)
        u = _ld(s0_ptr, idx, m, MASKED)
        wb = _ld(s1_ptr, idx, m, MASKED)
        # ‖w̄ − θ‖² before the weights move;  θ ← θ + u;  u ← a u
        diff = wb - th
        acc += diff * diff
        _st(p_ptr, idx, (th + u).to(p_ptr.dtype.element_ty), m, MASKED)
        _st(s0_ptr, idx, a * u, m, MASKED)
    return acc


@triton.jit
def momentum_predict_kernel(chunk_seg, chunk_start, seg_numel, p_base, p_off, s0_base, s0_off, s1_base, s1_off,
                            partials, code_ptr, a_hi, a_lo, USE_CODE: tl.constexpr, ALIGNED: tl.constexpr,
                            VEC_P: tl.constexpr, VEC_S: tl.constexpr, S_DT: tl.constexpr, CHUNK: tl.constexpr,
                            BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=S_DT)
    run = 1
    if USE_CODE:
        run = tl.where((tl.load(code_ptr) & 7) == 0, 1, 0)
    if run == 1:
        seg = tl.load(chunk_seg + pid)
        start = tl.multiple_of(tl.load(chunk_start + pid), CHUNK)
        n = tl.load(seg_numel + seg)
        end = tl.minimum(start + CHUNK, n)
        p_ptr = _seg_ptr(p_base, p_off, seg, VEC_P, ALIGNED)
        s0_ptr = _seg_ptr(s0_base, s0_off, seg, VEC_S, ALIGNED)
        s1_ptr = _seg_ptr(s1_base, s1_off, seg, VEC_S, ALIGNED)
        a = _pair(a_hi, a_lo, S_DT)
        if end - start == CHUNK:
            acc = _predict_blocks(p_ptr, s0_ptr, s1_ptr, start, end, CHUNK // BLOCK, a, acc, False, S_DT, BLOCK)
        else:
            acc = _predict_blocks(p_ptr, s0_ptr, s1_ptr, start, end, tl.cdiv(end - start, BLOCK), a, acc, True,
                                  S_DT, BLOCK)
    tl.store(partials + pid * 8, tl.sum(acc, 0))
    for j in tl.static_range(1, 8):
        tl.store(partials + pid * 8 + j, tl.sum(acc, 0) * 0.0)
