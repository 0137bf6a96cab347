"""Batched Newton solver for the objectives of :func:`vrpo.fit_bt` (one job: minimise).

Every objective is, per replication (the ``W`` leading rows of every array),

    F(theta) = sum_blocks sum_rows c_r softplus(x_r . theta) - b . theta + ridge/2 |theta|^2,

``b = sum_rows t_r x_r`` (the linear part, computed once: at ``lam = 1`` the labelled
pairs contribute only to ``b``, and their rows are never touched by the iterations).

The solver is a Newton method built for this structure:

- rows are stored transposed, ``XT (W, d, rows)``, one C-contiguous block per row
  group, so margins ``theta XT``, the gradient ``XT s`` and the Hessian
  ``(XT * w) XT^T`` are single BLAS calls per replication over contiguous memory;
  callers pass chunks of replications small enough to stay in cache for all
  iterations (:func:`vrpo.fit.fit_bt` does);
- a factorised Hessian is reused across iterations (chord steps) while each full
  step cuts the gradient norm by at least ``_CHORD_RATE``; it is refreshed when
  progress stalls, and for the final step (so the result has Newton's quadratic,
  not the chord's linear, accuracy);
- the objective is not evaluated while the full step reduces the gradient norm
  (``_ACCEPT``); otherwise an Armijo backtracking search on ``F`` is the safeguard.
  Margins along the step are linear in the step length, so backtracking costs no
  pass over the rows;
- a step that would take ``max|theta|`` past ``theta_max`` is cut at the bound and
  must pass the Armijo test; a replication that reaches the bound and would go
  further stops there (no finite minimiser, or one beyond the bound), as does one
  whose line search fails; the stopping rule is ``max|step| <= tol (1 + max|theta|)``.

:func:`minimise_fast` runs the common case of the same method in a lean loop (no
objective, no line search, no bound handling; the first Hessian at ``theta = 0`` a
Gram matrix; a final chord step and a predicted stop, both verified by the caller
with :func:`newton_step_small` at the result) and hands every replication that needs
a safeguard to :func:`minimise`. :func:`vrpo.fit_bt` uses it.

Stopping is not convergence: :func:`vrpo.separation.certify` decides whether a
minimiser is there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Blocks", "Scratch", "evaluate", "minimise", "minimise_fast", "newton_step_small", "sigmoid_at",
           "STOP_RULE", "STOP_THETA_MAX", "STOP_MAX_ITER", "STOP_LINE_SEARCH"]

# why minimise stopped, per replication
STOP_RULE, STOP_THETA_MAX, STOP_MAX_ITER, STOP_LINE_SEARCH = 0, 1, 2, 3

_ACCEPT = 0.9  # accept a full step without evaluating F when |grad| falls below this fraction
_CHORD_RATE = 0.01  # keep the factorised Hessian while |grad| falls at least this fast per step
_ARMIJO = 1e-4
_PREDICT = 0.1  # fast path: stop when the predicted next step is this fraction of the stopping rule's bound


@dataclass
class Blocks:
    """Rows of ``F`` for ``W`` replications.

    ``XT``: list of ``(W, d, rows_k)`` C-contiguous float64 blocks; ``c``: matching
    curvature weights, ``(W, 1)`` (one weight per block and replication) or
    ``(W, rows_k)``; ``b (W, d)``: the linear part ``sum_rows t_r x_r``; ``rowsum``:
    ``sum_rows x_r`` per block, ``(W, d)`` (computed with ``b`` in the same pass; the
    gradient at ``theta = 0``, where every sigmoid is 1/2, needs nothing else).
    """

    XT: list
    c: list
    b: np.ndarray
    rowsum: list | None = None

    @classmethod
    def from_rows(cls, Xs, cs, ts, transposed=False):
        """``Xs``: row blocks ``(W, rows, d)`` (or ``(W, d, rows)`` if ``transposed``);
        ``cs``: ``(W,)`` or ``(W, rows)``; ``ts``: ``(W, rows)``."""
        XT = [np.ascontiguousarray(x if transposed else np.swapaxes(x, 1, 2), dtype=float) for x in Xs]
        W, d = XT[0].shape[:2]
        b = np.zeros((W, d))
        rowsum = []
        for xt, t in zip(XT, ts):
            t = np.asarray(t, dtype=float)
            bt = np.matmul(xt, np.stack([t, np.ones_like(t)], axis=-1))  # (W, d, 2): one pass for both
            b += bt[..., 0]
            rowsum.append(bt[..., 1])
        c = [np.asarray(ci, dtype=float).reshape(W, -1) for ci in cs]
        return cls(XT, c, b, rowsum)

    @property
    def shape(self):
        return self.b.shape

    def take(self, idx):
        return Blocks([x[idx] for x in self.XT], [c[idx] for c in self.c], self.b[idx],
                      None if self.rowsum is None else [r[idx] for r in self.rowsum])

    def active(self):
        """Indices of blocks with some non-zero curvature (the others are all in ``b``)."""
        return [k for k, c in enumerate(self.c) if np.any(c != 0)]


def _sigmoid(delta):
    """``1 / (1 + exp(-delta))``; call under ``np.errstate(over="ignore")``: exp overflow
    gives the exact limit 0 (the errstate is set once per solve, not per call)."""
    out = np.negative(delta)
    np.exp(out, out=out)
    out += 1.0
    return np.reciprocal(out, out=out)


def _softplus(delta):
    return np.maximum(delta, 0.0) + np.log1p(np.exp(-np.abs(delta)))


def margins(B, theta, blocks=None):
    """``[theta XT_k]`` for the active blocks: list of ``(W, rows_k)``."""
    ks = B.active() if blocks is None else blocks
    return {k: np.matmul(theta[:, None, :], B.XT[k])[:, 0, :] for k in ks}


def gradient(B, theta, s, ridge):
    """``sum_k XT_k (c_k s_k) - b + ridge theta`` from sigmoids ``s`` (dict by block)."""
    g = ridge * theta - B.b
    for k, sk in s.items():
        g = g + np.matmul(B.XT[k], (B.c[k] * sk)[..., None])[..., 0]
    return g


def hessian(B, s, ridge, idx=None):
    """``sum_k (XT_k * c_k s_k (1 - s_k)) XT_k^T + ridge I``, ``(W, d, d)``; with ``idx``
    only for those replications (``s`` then holds only theirs), one at a time on views of
    their rows (no copy of the rows)."""
    d = B.shape[1]
    W = B.shape[0] if idx is None else len(idx)
    H = np.broadcast_to(ridge * np.eye(d), (W, d, d)).copy()
    for k, sk in s.items():
        w = (B.c[k] if idx is None else B.c[k][idx]) * sk * (1.0 - sk)  # (W, rows)
        if idx is None:
            H += np.matmul(B.XT[k] * w[:, None, :], np.swapaxes(B.XT[k], 1, 2))
        else:
            for j, i in enumerate(idx):
                XT = B.XT[k][i]  # (d, rows) view
                H[j] += (XT * w[j]) @ XT.T
    return H


def objective(B, theta, delta, ridge, idx=None):
    """``F`` from the margins ``delta`` (dict by active block); ``idx`` selects the
    replications that ``theta`` and ``delta`` hold (default all). No pass over the rows."""
    b = B.b if idx is None else B.b[idx]
    f = 0.5 * ridge * np.sum(theta**2, axis=-1) - np.sum(b * theta, axis=-1)
    for k, dk in delta.items():
        c = B.c[k] if idx is None else B.c[k][idx]
        f = f + np.sum(c * _softplus(dk), axis=-1)
    return f


def evaluate(B, theta, ridge, order=2):
    """``(F, grad, H)`` at ``theta`` (``H`` for ``order >= 2``, ``grad`` for ``order >= 1``)."""
    delta = margins(B, theta)
    with np.errstate(over="ignore"):
        s = {k: _sigmoid(v) for k, v in delta.items()}
    f = objective(B, theta, delta, ridge)
    g = gradient(B, theta, s, ridge) if order >= 1 else None
    H = hessian(B, s, ridge) if order >= 2 else None
    return f, g, H


def _inverse(H):
    """Inverse of symmetric Hessians with a relative 1e-12 jitter (singular ones stay solvable)."""
    d = H.shape[-1]
    scale = np.trace(H, axis1=1, axis2=2)[:, None, None] / d
    # no curvature at all (every weight underflowed): the identity, i.e. a gradient step
    jitter = np.where(np.abs(scale) > 1e-250, 1e-12 * np.abs(scale), 1.0)
    Hj = H + jitter * np.eye(d)
    try:
        return np.linalg.inv(Hj)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(Hj, hermitian=True)


def _restart_far(B, th, delta, ridge):
    """Start from ``theta = 0`` where it is better than ``theta0`` (a far or saturated start
    makes Newton's first steps useless); ``F(0) = log 2 sum c`` needs no pass over the rows.
    Resets ``th`` and ``delta`` in place; returns the reset replications."""
    moved = np.flatnonzero(np.any(th != 0, axis=1))
    if not moved.size:
        return moved
    f_start = objective(B, th[moved], {k: v[moved] for k, v in delta.items()}, ridge, moved)
    f_zero = sum(np.log(2.0) * np.sum(np.broadcast_to(B.c[k][moved], delta[k][moved].shape), axis=1)
                 for k in delta) if delta else np.zeros(moved.size)
    reset = moved[~(f_start <= f_zero)]
    th[reset] = 0.0
    for k in delta:
        delta[k][reset] = 0.0
    return reset


def minimise(B, theta0, ridge, tol, max_iter, theta_max):
    """Minimise ``F`` for each replication from ``theta0 (W, d)``.

    Returns ``(theta, stop, n_iter)``: ``theta`` the last iterate (after the final, small
    step for replications stopped by the rule), ``stop`` why each stopped (``STOP_*``),
    ``n_iter`` the iterations used. Each replication's path depends on its own rows
    only (every decision is per replication), so batching does not change results.
    """
    with np.errstate(over="ignore"):
        return _minimise(B, theta0, ridge, tol, max_iter, theta_max)


def _minimise(B, theta0, ridge, tol, max_iter, theta_max):
    W, d = theta0.shape
    theta_out = np.array(theta0, dtype=float)
    stop_out = np.full(W, STOP_MAX_ITER)
    iter_out = np.zeros(W, dtype=int)
    idx = np.arange(W)  # original index of each working replication
    Bw = B
    th = theta_out.copy()
    ks = B.active()  # fixed for the whole solve: dropping replications must not change the blocks
    delta = margins(Bw, th, ks)
    reset = _restart_far(Bw, th, delta, ridge)
    theta_out[reset] = 0.0
    s = {k: _sigmoid(v) for k, v in delta.items()}
    g = gradient(Bw, th, s, ridge)
    gn = np.linalg.norm(g, axis=1)
    Hinv = np.zeros((len(th), d, d))
    need = np.ones(len(th), dtype=bool)  # Hessian to (re)factorise before the next step
    fresh = np.zeros(len(th), dtype=bool)  # Hinv computed at the current iterate
    live = np.ones(len(th), dtype=bool)

    def refresh(which):
        """Factorise the Hessian at the current iterate of replications ``which`` only, so
        each replication's path does not depend on the others in its batch."""
        r = np.flatnonzero(which)
        if r.size:
            if r.size == len(th):
                Hinv[:] = _inverse(hessian(Bw, s, ridge))
            else:
                Hinv[r] = _inverse(hessian(Bw, {k: v[r] for k, v in s.items()}, ridge, r))
            fresh[r] = True
            need[r] = False

    for it in range(1, max_iter + 1):
        refresh(need & live)
        p = -np.matmul(Hinv, g[..., None])[..., 0]
        slope = np.sum(g * p, axis=1)
        stale = live & ~(slope < 0) & ~fresh
        if stale.any():  # a reused Hessian gave no descent direction: refresh it
            refresh(stale)
            p[stale] = -np.matmul(Hinv[stale], g[stale][..., None])[..., 0]
            slope[stale] = np.sum(g[stale] * p[stale], axis=1)
        bad = ~(slope < 0)  # non-descent with a fresh Hessian (lam > 1, or g = 0): gradient step
        p[bad] = -g[bad]
        slope[bad] = -gn[bad] ** 2
        iter_out[idx[live]] = it
        small = live & (np.max(np.abs(p), axis=1) <= tol * (1.0 + np.max(np.abs(th), axis=1)))
        last = small & ~fresh & ~bad
        if last.any():  # the final step is a true Newton step (quadratic, not chord, accuracy)
            refresh(last)
            p[last] = -np.matmul(Hinv[last], g[last][..., None])[..., 0]
        # a full step past theta_max is cut at the bound and must pass the Armijo test;
        # an iterate already at the bound stays there (no finite minimiser within it)
        over = live & ~small & (np.max(np.abs(th + p), axis=1) > theta_max)
        at_bound = np.zeros(len(th), dtype=bool)
        if over.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                room = np.where(p > 0, (theta_max - th) / p, np.where(p < 0, (theta_max + th) / -p, np.inf))
            a_max = np.clip(np.min(room[over], axis=1), 0.0, 1.0)
            p[over] *= a_max[:, None]
            slope[over] *= a_max
            at_bound[over] = np.max(np.abs(th[over]), axis=1) >= (1.0 - 1e-9) * theta_max
        # stopped by the rule: take the final small step; at the bound: stay
        th[small] += p[small]
        stop_out[idx[small]] = STOP_RULE
        stop_out[idx[at_bound]] = STOP_THETA_MAX
        live &= ~(small | at_bound)
        if live.any():
            cand = th + p
            cand[~live] = th[~live]
            if over.any():  # land exactly inside the bound despite rounding
                cand[over] = np.clip(cand[over], -theta_max, theta_max)
                p[over] = cand[over] - th[over]
            d_c = margins(Bw, cand, ks)
            s_c = {k: _sigmoid(v) for k, v in d_c.items()}
            g_c = gradient(Bw, cand, s_c, ridge)
            gn_c = np.linalg.norm(g_c, axis=1)
            ok = ~live | ((gn_c <= _ACCEPT * gn) & ~over)
            back = np.flatnonzero(~ok)
            failed = np.zeros(len(th), dtype=bool)
            if back.size:  # safeguard: Armijo on F along the step (margins are linear in it)
                f0 = objective(Bw, th[back], {k: v[back] for k, v in delta.items()}, ridge, back)
                a = np.ones(back.size)
                todo = np.arange(back.size)
                for _ in range(60):
                    bb = back[todo]
                    d_a = {k: delta[k][bb] + a[todo, None] * (d_c[k][bb] - delta[k][bb]) for k in delta}
                    fa = objective(Bw, th[bb] + a[todo, None] * p[bb], d_a, ridge, bb)
                    good = np.isfinite(fa) & (fa <= f0[todo] + _ARMIJO * a[todo] * slope[bb] + 1e-15 * np.abs(f0[todo]))
                    todo = todo[~good]
                    if todo.size == 0:
                        break
                    a[todo] *= 0.5
                failed[back[todo]] = True
                a[todo] = 0.0
                partial = back[a < 1.0]
                if partial.size:  # backtracked: gradient at the shorter step
                    ap = a[a < 1.0][:, None]
                    cand[partial] = th[partial] + ap * p[partial]
                    sub = Bw.take(partial)
                    for k in d_c:
                        d_c[k][partial] = delta[k][partial] + ap * (d_c[k][partial] - delta[k][partial])
                        s_c[k][partial] = _sigmoid(d_c[k][partial])
                    g_c[partial] = gradient(sub, cand[partial], {k: v[partial] for k, v in s_c.items()}, ridge)
                    gn_c[partial] = np.linalg.norm(g_c[partial], axis=1)
            # keep the factorised Hessian only where the step made fast progress
            need |= live & ~(gn_c <= _CHORD_RATE * gn)
            th, delta, s, g, gn = cand, d_c, s_c, g_c, gn_c
            fresh[:] = False
            stop_out[idx[failed & live]] = STOP_LINE_SEARCH
            live &= ~failed
        theta_out[idx] = th
        if not live.any():
            break
        if live.sum() <= 0.5 * len(idx) and len(idx) > 1:  # drop finished replications
            keep = np.flatnonzero(live)
            Bw, idx, th, g, gn, live = Bw.take(keep), idx[keep], th[keep], g[keep], gn[keep], live[keep]
            Hinv, need, fresh = Hinv[keep], need[keep], fresh[keep]
            delta = {k: v[keep] for k, v in delta.items()}
            s = {k: v[keep] for k, v in s.items()}
    return theta_out, stop_out, iter_out


# --------------------------------------------------------------------------- the fast path


class Scratch:
    """Work arrays reused from chunk to chunk, by name.

    A new large array costs a page fault per 4 KiB page on its first touch: measured on
    the benchmark's chunk (6 replications of 8000 x 8 rows), the weighted copy of the
    rows took 50 us per replication into a new array, 18 us into a reused one. A caller
    must not keep a scratch array past the next request for the same name. Names used:
    ``rows{k}`` and ``sig{k}``, weighted rows and sigmoids of block ``k`` (0 labelled, 1
    extra pairs), by the solver and then by the sandwich, which run one after the other
    (sharing keeps a chunk's working set small).
    """

    def __init__(self):
        self._mem = {}

    def __call__(self, name, shape):
        size = math.prod(shape)
        buf = self._mem.get(name)
        if buf is None or buf.size < size:
            buf = self._mem[name] = np.empty(size)
        return buf[:size].reshape(shape)


def sigmoid_at(theta, XT, out):
    """``sigma(theta XT)``, ``(W, rows)``, for ``theta (W, d)``, ``XT (W, d, rows)``, computed in
    ``out (W, 1, rows)`` (margins of ``-theta``, so the sigmoid is three passes over ``rows``)."""
    m = np.matmul(-theta[:, None, :], XT, out=out)[:, 0, :]
    np.exp(m, out=m)  # overflow gives inf, then the exact limit 0
    m += 1.0
    return np.reciprocal(m, out=m)


def minimise_fast(B, theta0, ridge, tol, max_iter, theta_max, scratch=None):
    """:func:`minimise` for the common case, with :func:`minimise` as its fallback.

    A lean Newton/chord loop with the same stopping rule, step acceptance (the full step
    must cut the gradient norm by ``_ACCEPT``) and chord policy (``_CHORD_RATE``), minus
    everything that only a difficult replication needs: a replication whose step is not
    a descent direction, would pass ``theta_max``, fails the gradient test (the point
    where :func:`minimise` would start its Armijo search), meets a non-finite number or
    runs out of iterations is handed to :func:`minimise`, from ``theta0``. Other savings:
    at ``theta = 0`` the sigmoids are exactly 1/2, so the first Hessian is a plain Gram
    matrix (no margins, no weights); a block with one curvature weight per replication
    scales ``XT s`` and the Hessian by it after the product; the final step may be a
    chord step (no Hessian refresh just for it); and a replication also stops when the
    step after this one is predicted to pass the rule ten times over (``_PREDICT``) at
    the rate ``rho <= _CHORD_RATE`` its gradient norm fell on the last step, which saves
    the evaluation that would only confirm it.

    Returns ``(theta, stop, n_iter, chord)``: as :func:`minimise`, plus ``chord (W,)``, the
    replications the fast loop finished. Their last step used a possibly reused Hessian
    and their stop may be predicted, so the caller checks the Newton step at the result
    (:func:`newton_step_small`, from the gradient and Hessian it evaluates there anyway)
    and re-solves with :func:`minimise` where it does not pass the stopping rule: every
    returned fit satisfies the rule at the returned ``theta`` itself. Every decision is
    per replication.
    """
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # inf/NaN: handed to minimise
        theta, stop, n_iter, hard = _minimise_fast(B, theta0, ridge, tol, max_iter, theta_max, scratch or Scratch())
    with np.errstate(over="ignore"):
        h = np.flatnonzero(hard)
        if h.size:
            theta[h], stop[h], n_iter[h] = _minimise(B.take(h), theta0[h], ridge, tol, max_iter, theta_max)
    return theta, stop, n_iter, ~hard


def newton_step_small(grad, H, theta, tol):
    """``(W,)`` bool: the Newton step ``H^-1 grad`` at ``theta`` passes the stopping rule
    ``max|step| <= tol (1 + max|theta|)`` (``grad (W, d)``, ``H (W, d, d)`` at ``theta``)."""
    try:
        p = np.linalg.solve(H, grad[..., None])[..., 0]
    except np.linalg.LinAlgError:  # an exactly singular H somewhere: the jittered inverse
        p = np.matmul(_inverse(H), grad[..., None])[..., 0]
    return np.abs(p).max(axis=1) <= tol * (1.0 + np.abs(theta).max(axis=1))


def _fast_gradient(XT, C, S, b, th, ridge):
    """``sum_k XT_k (c_k s_k) - b + ridge theta``; a per-replication weight ``c_k (W, 1)``
    scales the product ``XT_k s_k`` (d numbers) instead of the rows."""
    g = ridge * th - b
    for xt, c, s in zip(XT, C, S):
        if c.shape[1] == 1:
            g += c * np.matmul(xt, s[..., None])[..., 0]
        else:
            g += np.matmul(xt, (c * s)[..., None])[..., 0]
    return g


def _fast_hessian(XT, C, S, ridge, r, at_zero, buf):
    """Hessians of replications ``r`` (indices into the working batch; all of them when
    ``r`` is None): ``sum_k c_k XT_k diag(s_k (1 - s_k)) XT_k^T + ridge I``. Where
    ``at_zero`` (bool per member of ``r``), ``s = 1/2`` exactly: ``c_k/4 XT_k XT_k^T``.
    ``buf``: scratch per block, the shape of ``XT_k``."""
    W, d = XT[0].shape[0], XT[0].shape[1]
    m = W if r is None else len(r)
    H = np.zeros((m, d, d))
    if r is None and (at_zero.all() or not at_zero.any()):
        zero = bool(at_zero.all())
        for xt, c, s, bk in zip(XT, C, S, buf):
            if zero:  # every sigmoid is 1/2: a Gram matrix, c/4 XT XT^T
                if c.shape[1] == 1:  # (product with a copy: numpy's syrk for X X^T measured 2.4x slower than gemm)
                    np.copyto(bk, xt)
                    H += (0.25 * c[:, :, None]) * np.matmul(bk, np.swapaxes(xt, 1, 2))
                else:
                    H += np.matmul(np.multiply(xt, (0.25 * c)[:, None, :], out=bk), np.swapaxes(xt, 1, 2))
                continue
            w = s * (1.0 - s)  # (W, rows)
            if c.shape[1] != 1:
                w *= c
            np.multiply(xt, w[:, None, :], out=bk)
            G = np.matmul(bk, np.swapaxes(xt, 1, 2))
            H += c[:, :, None] * G if c.shape[1] == 1 else G
    else:  # some replications, one at a time on views of their rows (no copy)
        r = np.arange(W) if r is None else r
        for j, i in enumerate(r):
            for xt, c, s in zip(XT, C, S):
                x = xt[i]  # (d, rows)
                if at_zero[j]:  # the same arithmetic as the batched branch above
                    H[j] += (0.25 * c[i, 0]) * (x.copy() @ x.T) if c.shape[1] == 1 else (x * (0.25 * c[i])) @ x.T
                elif c.shape[1] == 1:
                    H[j] += c[i, 0] * ((x * (s[i] * (1.0 - s[i]))) @ x.T)
                else:
                    H[j] += (x * (s[i] * (1.0 - s[i]) * c[i])) @ x.T
    if ridge:
        H += ridge * np.eye(d)
    return H


def _minimise_fast(B, theta0, ridge, tol, max_iter, theta_max, scratch):
    W, d = theta0.shape
    ks = B.active()
    XT = [B.XT[k] for k in ks]
    C = [B.c[k] for k in ks]
    b = B.b
    th = np.array(theta0, dtype=float)
    zero = ~np.any(th != 0, axis=1)  # starts at 0: every sigmoid is exactly 1/2
    scalar_c = all(c.shape[1] == 1 for c in C)
    from_rowsum = bool(zero.all() and B.rowsum is not None and scalar_c)
    if from_rowsum:
        S = [None] * len(XT)  # not needed: the first Hessian is a Gram matrix, the gradient below
    elif zero.all():
        S = [np.full((W, x.shape[2]), 0.5) for x in XT]
    else:
        delta = {k: np.matmul(th[:, None, :], B.XT[k])[:, 0, :] for k in ks}
        zero |= np.isin(np.arange(W), _restart_far(B, th, delta, ridge))
        S = [_sigmoid(delta[k]) for k in ks]
    theta_out = th.copy()
    stop_out = np.full(W, STOP_MAX_ITER)
    iter_out = np.zeros(W, dtype=int)
    hard = np.zeros(W, dtype=bool)
    idx = np.arange(W)  # original index of each working replication
    if from_rowsum:
        g = -b  # at theta = 0: sum_k c_k / 2 sum_rows x_r - b, no pass over the rows
        for k, c in zip(ks, C):
            g = g + (0.5 * c) * B.rowsum[k]
    else:
        g = _fast_gradient(XT, C, S, b, th, ridge)
    gn = np.sqrt(np.einsum("ij,ij->i", g, g))
    Hinv = np.zeros((W, d, d))
    need = np.ones(W, dtype=bool)  # Hessian to (re)factorise before the next step (live ones only)
    live = np.ones(W, dtype=bool)
    rho = np.full(W, np.inf)  # how fast |grad| fell on the last step
    buf = [scratch(f"rows{k}", x.shape) for k, x in zip(ks, XT)]  # block k's weighted rows
    for it in range(1, max_iter + 1):
        if need.any():  # need implies live
            at_zero = zero if it == 1 else np.zeros(len(idx), dtype=bool)  # th is still theta0 only at it 1
            if need.all():
                Hinv[:] = _inverse(_fast_hessian(XT, C, S, ridge, None, at_zero, buf))
            else:
                r = np.flatnonzero(need)
                Hinv[r] = _inverse(_fast_hessian(XT, C, S, ridge, r, at_zero[r], buf))
        p = np.matmul(Hinv, g[..., None])[..., 0]
        np.negative(p, out=p)
        slope = np.einsum("ij,ij->i", g, p)
        step = np.abs(p).max(axis=1)
        bound = np.abs(th).max(axis=1)
        bound += 1.0
        bound *= tol
        thp = th + p
        # what only minimise handles: no descent, a step past theta_max (or NaN)
        ok = (slope < 0) & (np.abs(thp).max(axis=1) <= theta_max)
        # stop: the step passes the rule, or the next one will by a factor 10 at the rate
        # the gradient has been falling (rho <= _CHORD_RATE); the caller verifies either
        # with the Newton step at the result
        small = live & ((step <= bound) | (ok & (rho * step <= _PREDICT * bound)))
        trouble = live & ~small & ~ok
        done = small | trouble
        if done.any():
            iter_out[idx[done]] = it
            fin = idx[small]
            theta_out[fin] = thp[small]
            stop_out[fin] = STOP_RULE
            hard[idx[trouble]] = True
            live &= ~done
            if not live.any():
                break
            if live.sum() <= 0.5 * len(idx):  # drop finished replications
                keep = np.flatnonzero(live)
                XT, C, buf = [x[keep] for x in XT], [c[keep] for c in C], [x[:len(keep)] for x in buf]
                b, idx, th, thp, g, gn, live = b[keep], idx[keep], th[keep], thp[keep], g[keep], gn[keep], live[keep]
                Hinv, rho = Hinv[keep], rho[keep]
            th = np.where(live[:, None], thp, th)
        else:
            th = thp
        S = [sigmoid_at(th, x, scratch(f"sig{k}", (len(idx), 1, x.shape[2]))) for k, x in zip(ks, XT)]
        g_c = _fast_gradient(XT, C, S, b, th, ridge)
        gn_c = np.sqrt(np.einsum("ij,ij->i", g_c, g_c))
        fail = live & ~(gn_c <= _ACCEPT * gn)  # minimise would backtrack here (NaN included)
        if fail.any():
            iter_out[idx[fail]] = it
            hard[idx[fail]] = True
            live &= ~fail
        ratio = gn_c / gn
        need = live & ~(ratio <= _CHORD_RATE)  # keep the factorised Hessian only on fast progress
        rho = np.where(need, np.inf, ratio)  # contraction of the last step (inf: no prediction)
        g, gn = g_c, gn_c
    else:  # out of iterations: minimise decides
        iter_out[idx[live]] = max_iter
        hard[idx[live]] = True
    return theta_out, stop_out, iter_out, hard
