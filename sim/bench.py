"""Benchmarks, run side by side in one process and printed as ratios (never timed asserts).

The machine is shared, so every comparison is *interleaved*: each round times every
competitor once on the same data, in a rotating order; per-fit times are reported as
the minimum and the median over rounds, ratios as the ratio of the minima and the
median of the per-round ratios. The load average is recorded before and after.
Every competitor is warmed up before it is timed (its first call is timed separately
and reported on its own line). All competitors run under the same BLAS/OpenMP thread
limit (``threads``, default 1, via threadpoolctl where installed): on a loaded 2-core
machine two BLAS threads per small product measure contention, not the code (ppi_py,
which calls scikit-learn's multithreaded solver on every fit, ran 3-4x slower with
two threads than with one under a load average of 5).

1. ``fit``: batched :func:`vrpo.fit_bt` (n = 2000, d = 8, N = 8000 fresh-prompt extra
   pairs, R = 200 replications) at ``lam = 0``, ``1`` and ``"auto"`` against

   - a loop of ``ppi_py.ppi_logistic_pointestimate`` (``lam = 0``, ``1``, ``None``), the
     reference implementation of PPI++ logistic regression;
   - :func:`plain_newton`, a plain NumPy batched Newton that exploits the problem's
     structure (the ``lam = 1`` labelled part is linear) without any safeguard, kept
     here as the floor a NumPy implementation reaches (``lam = 0`` and ``1``).

   Agreement of the estimates is reported beside each ratio. ``ppi_py`` estimates the
   power-tuned ``lam`` differently (at its ``lam = 1`` fit, pooled variance), so for
   ``"auto"`` it also reports ``fit_bt`` run at ``ppi_py``'s own ``lam``.
2. ``first-fit``: time from a fresh Python process to the first finished fit (imports
   and one-time start-up included), for ``fit_bt`` and ``ppi_py``.
3. ``scaling``: cost of ``fit_bt`` when R, n, N or d doubles (about 2 expected for R, n
   and N; the Hessian grows with d^2).
4. ``memory``: peak resident memory of a sweep (R = 10,000, n = 4,000, M = 4, d = 8) in
   a child process (opt-in: several minutes).
5. ``kernel``: a fused numba gradient kernel against the NumPy evaluation it would
   replace (the issue's bar for a compiled kernel: >= 2x); skipped without numba.

:func:`write_markdown` turns the results into the generated performance table that the
README embeds (``vrpo bench --markdown docs/performance.md``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import warnings

import numpy as np

import vrpo

__all__ = ["plain_newton", "bench_fit", "bench_first_fit", "bench_scaling", "bench_memory", "bench_kernel",
           "write_markdown", "main"]


def _problem(R, n, N, d, seed=0):
    """A misspecified BT problem with fresh-prompt extra pairs and a noisy ``g``."""
    from scipy.special import expit

    rng = np.random.default_rng(seed)
    theta = rng.normal(size=d) / np.sqrt(d)
    X = rng.normal(size=(R, n, d))  # (R, n, d)
    p = expit(X @ theta + 0.5 * np.sin(2 * X[..., 0]))
    Z = (rng.random((R, n)) < p).astype(float)
    g = np.clip(p + 0.1 * rng.normal(size=p.shape), 0.01, 0.99)
    Xa = rng.normal(size=(R, N, d))  # (R, N, d)
    pa = expit(Xa @ theta + 0.5 * np.sin(2 * Xa[..., 0]))
    ga = np.clip(pa + 0.1 * rng.normal(size=pa.shape), 0.01, 0.99)
    return X, Z, g, Xa, ga


# --------------------------------------------------------------------------- the plain reference


def plain_newton(X, Z, g, Xa, ga, lam=1.0, *, tol=1e-10, max_iter=100, damped=False):
    """Plain batched Newton on ``L_VR`` with fresh-prompt extra pairs, all replications at once.

    ``X (R, n, d)``, ``Z, g (R, n)``, ``Xa (R, N, d)``, ``ga (R, N)``, scalar ``lam`` in
    [0, 1]. The textbook method: a full float64 Hessian and a linear solve every
    iteration, stop when ``max|step| <= tol (1 + max|theta|)``. It uses the structure
    (the labelled part at ``lam = 1`` is linear in ``theta``: a constant gradient term),
    nothing else: no chunking, no reuse of Hessians, no safeguards unless ``damped``
    (Armijo backtracking on the objective, and a least-squares solve for singular
    Hessians), which the tests use on hard problems. Returns ``(theta (R, d), iterations)``.
    """
    R, n, d = X.shape
    N = Xa.shape[1]
    b = np.matmul((Z - lam * g)[:, None, :], X)[:, 0] / n + lam * np.matmul(ga[:, None, :], Xa)[:, 0] / N  # (R, d)

    def sig(x):
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-x))

    def objective(th):
        f = -np.sum(b * th, axis=1)
        if lam != 0:
            f += lam / N * np.sum(np.logaddexp(0.0, np.matmul(Xa, th[:, :, None])[..., 0]), axis=1)
        if lam != 1:
            f += (1 - lam) / n * np.sum(np.logaddexp(0.0, np.matmul(X, th[:, :, None])[..., 0]), axis=1)
        return f

    theta = np.zeros((R, d))
    for it in range(1, max_iter + 1):
        grad = -b.copy()
        H = np.zeros((R, d, d))
        if lam != 0:
            sa = sig(np.matmul(Xa, theta[:, :, None])[..., 0])  # (R, N)
            grad += lam / N * np.matmul(sa[:, None, :], Xa)[:, 0]
            H += lam / N * np.matmul(np.swapaxes(Xa, 1, 2), (sa * (1 - sa))[..., None] * Xa)
        if lam != 1:
            s = sig(np.matmul(X, theta[:, :, None])[..., 0])  # (R, n)
            grad += (1 - lam) / n * np.matmul(s[:, None, :], X)[:, 0]
            H += (1 - lam) / n * np.matmul(np.swapaxes(X, 1, 2), (s * (1 - s))[..., None] * X)
        if damped:
            step = -np.stack([np.linalg.lstsq(H[r], grad[r], rcond=1e-13)[0] for r in range(R)])
            f0, alpha = objective(theta), np.ones(R)
            slope = np.sum(grad * step, axis=1)
            for _ in range(60):
                bad = ~(objective(theta + alpha[:, None] * step) <= f0 + 1e-4 * alpha * slope + 1e-15 * np.abs(f0))
                if not bad.any():
                    break
                alpha[bad] *= 0.5
            step *= alpha[:, None]
        else:
            step = -np.linalg.solve(H, grad[..., None])[..., 0]
        theta = theta + step
        if np.max(np.abs(step)) <= tol * (1 + np.max(np.abs(theta))):
            break
    return theta, it


# --------------------------------------------------------------------------- timing helpers


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _interleaved(fns: dict, rounds: int) -> dict:
    """``{name: [seconds per round]}``: every round times each function once, rotating the order."""
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return times


def _first_call(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _ratio(num: list, den: list) -> dict:
    """Ratio of the minima and median of per-round ratios of two per-fit time lists."""
    num, den = np.asarray(num), np.asarray(den)
    return {"min": float(num.min() / den.min()), "median": float(np.median(num / den))}


# --------------------------------------------------------------------------- benchmarks


def bench_fit(R=200, n=2000, N=8000, d=8, ppi_reps=20, rounds=5, lams=(0.0, 1.0, "auto")) -> dict:
    """fit_bt vs the ppi_py loop and the plain Newton, per lam; see the module docstring."""
    X, Z, g, Xa, ga = _problem(R, n, N, d)
    try:
        from ppi_py import ppi_logistic_pointestimate as ppi
    except ImportError:  # pragma: no cover - ppi_py is in the test extra
        ppi = None
    k = min(ppi_reps, R) if ppi is not None else 0
    out = {"R": R, "n": n, "N": N, "d": d, "ppi_reps": k, "rounds": rounds, "load_before": _loadavg(), "lam": {}}
    for lam in lams:
        ppi_lam = {0.0: 0, 1.0: 1, "auto": None}.get(lam, lam)
        res = {}

        def ours():
            res["fit"] = vrpo.fit_bt(X, Z, g, Xa, ga, lam=lam, warn=False)

        fns = {"fit_bt": ours}
        first = {"fit_bt": _first_call(lambda: vrpo.fit_bt(X[:1], Z[:1], g[:1], Xa[:1], ga[:1], lam=lam, warn=False))}
        if lam != "auto":
            def plain():
                res["plain"] = plain_newton(X, Z, g, Xa, ga, lam=float(lam))[0]

            fns["plain"] = plain
            first["plain"] = _first_call(lambda: plain_newton(X[:1], Z[:1], g[:1], Xa[:1], ga[:1], lam=float(lam)))
        if ppi is not None:
            def ppi_loop():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res["ppi"] = np.stack([ppi(X[r], Z[r], g[r], Xa[r], ga[r], lam=ppi_lam) for r in range(k)])

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                first["ppi_py"] = _first_call(lambda: ppi(X[0], Z[0], g[0], Xa[0], ga[0], lam=ppi_lam))
            fns["ppi_py"] = ppi_loop
        times = _interleaved(fns, rounds)
        per_fit = {"fit_bt": np.array(times["fit_bt"]) / R}
        if "plain" in times:
            per_fit["plain"] = np.array(times["plain"]) / R
        if "ppi_py" in times:
            per_fit["ppi_py"] = np.array(times["ppi_py"]) / k
        r = {"per_fit_ms": {name: {"min": 1e3 * float(v.min()), "median": 1e3 * float(np.median(v))}
                            for name, v in per_fit.items()},
             "first_call_s": first, "all_converged": bool(res["fit"].converged.all())}
        if "plain" in per_fit:
            r["fit_bt_over_plain"] = _ratio(per_fit["fit_bt"], per_fit["plain"])
            r["max_abs_diff_plain"] = float(np.max(np.abs(res["fit"].theta - res["plain"])))
        if "ppi_py" in per_fit:
            r["ppi_over_fit_bt"] = _ratio(per_fit["ppi_py"], per_fit["fit_bt"])
            r["max_abs_diff_ppi"] = float(np.max(np.abs(res["fit"].theta[:k] - res["ppi"])))
            if lam == "auto":
                r.update(_auto_at_ppi_lam(X[:k], Z[:k], g[:k], Xa[:k], ga[:k], res["ppi"]))
        out["lam"][str(lam)] = r
    out["load_after"] = _loadavg()
    return out


def _auto_at_ppi_lam(X, Z, g, Xa, ga, ppi_theta) -> dict:
    """fit_bt at ppi_py's own power-tuned lam (its private helpers), to separate the
    estimator from the choice of lam."""
    try:
        from ppi_py.ppi import _calc_lam_glm, _logistic_get_stats, ppi_logistic_pointestimate
    except ImportError:  # pragma: no cover
        return {}
    lams = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(len(X)):
            th1 = ppi_logistic_pointestimate(X[r], Z[r], g[r], Xa[r], ga[r], lam=1)
            stats = _logistic_get_stats(th1, X[r], Z[r], g[r], Xa[r], ga[r], np.ones(len(Z[r])), np.ones(len(ga[r])))
            lams.append(_calc_lam_glm(*stats, clip=True))
    lams = np.asarray(lams, dtype=float)
    fit = vrpo.fit_bt(X, Z, g, Xa, ga, lam=lams, warn=False)
    return {"max_abs_diff_ppi_at_ppi_lam": float(np.max(np.abs(fit.theta - ppi_theta))),
            "ppi_lam_range": [float(lams.min()), float(lams.max())]}


_FIRST_FIT_CHILD = r"""
import json, sys, time, warnings
import numpy as np
rng = np.random.default_rng(0)  # the problem of sim.bench._problem, made without importing vrpo
d, n, N = 8, 2000, 8000
theta = rng.normal(size=d) / np.sqrt(d)
X = rng.normal(size=(1, n, d))
p = 1 / (1 + np.exp(-(X @ theta + 0.5 * np.sin(2 * X[..., 0]))))
Z = (rng.random((1, n)) < p).astype(float)
g = np.clip(p + 0.1 * rng.normal(size=p.shape), 0.01, 0.99)
Xa = rng.normal(size=(1, N, d))
pa = 1 / (1 + np.exp(-(Xa @ theta + 0.5 * np.sin(2 * Xa[..., 0]))))
ga = np.clip(pa + 0.1 * rng.normal(size=pa.shape), 0.01, 0.99)
lam = json.loads(sys.argv[2])
t1 = time.perf_counter()
if sys.argv[1] == "fit_bt":
    import vrpo
    t2 = time.perf_counter()
    vrpo.fit_bt(X, Z, g, Xa, ga, lam=lam, warn=False)
else:
    warnings.simplefilter("ignore")
    from ppi_py import ppi_logistic_pointestimate
    t2 = time.perf_counter()
    ppi_logistic_pointestimate(X[0], Z[0], g[0], Xa[0], ga[0], lam={1.0: 1, 0.0: 0, "auto": None}[lam])
t3 = time.perf_counter()
print(json.dumps({"import_s": t2 - t1, "first_fit_s": t3 - t2, "total_s": t3 - t1}))
"""


def bench_first_fit(lams=(1.0, "auto")) -> dict:
    """Seconds from a fresh process (data already made) to the first finished fit, for
    fit_bt and ppi_py: import plus first call (ppi_py's numba compilation included)."""
    out = {}
    for who in ("fit_bt", "ppi_py"):
        for lam in lams:
            proc = subprocess.run([sys.executable, "-c", _FIRST_FIT_CHILD, who, json.dumps(lam)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                out[f"{who} lam={lam}"] = {"error": proc.stderr.strip().splitlines()[-1:]}
                continue
            out[f"{who} lam={lam}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def bench_scaling(R=100, n=1000, N=4000, d=8, rounds=3, lam=1.0) -> dict:
    """fit_bt's time when R, n, N or d doubles, relative to the base problem (interleaved)."""
    shapes = {"base": (R, n, N, d), "2R": (2 * R, n, N, d), "2n": (R, 2 * n, N, d), "2N": (R, n, 2 * N, d),
              "2d": (R, n, N, 2 * d)}
    data = {k: _problem(*v, seed=1) for k, v in shapes.items()}
    fns = {k: (lambda a=a: vrpo.fit_bt(*a, lam=lam, warn=False)) for k, a in data.items()}
    for f in fns.values():
        f()  # warm
    times = _interleaved(fns, rounds)
    base = np.asarray(times["base"])
    return {"base_s": float(base.min()), "shape": shapes["base"], "lam": lam, "load": _loadavg(),
            "ratio": {k: {"min": float(np.min(v) / base.min()), "median": float(np.median(np.asarray(v) / base))}
                      for k, v in times.items() if k != "base"}}


_PEAK_RSS = r"""
def peak_rss_mib():
    # VmHWM of this process image: ru_maxrss is inherited from the parent across fork+exec
    # on Linux, so a child started by a large parent would report the parent's peak
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

_MEMORY_CHILD = _PEAK_RSS + r"""
import json, sys, time
from sim import ExperimentConfig, run_experiment
cfg = ExperimentConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
df = run_experiment(cfg, write=False)
print(json.dumps({"rows": len(df), "seconds": time.perf_counter() - t, "peak_rss_mib": peak_rss_mib()}))
"""


def bench_memory(reps=10_000, n=4000, M=4, d=8, chunk_size=50) -> dict:
    """Peak RSS of a sweep in a fresh child process (one scenario, oracle g, MLE and VR)."""
    cfg = dict(scenarios=["mixture:1.0"], n=[n], M=M, d=d, reps=reps, g=["oracle"], methods=["mle", "vr"],
               chunk_size=chunk_size, progress=False, n_eval=500)
    base = subprocess.run([sys.executable, "-c", _PEAK_RSS + "\nimport numpy, pandas, scipy\nprint(peak_rss_mib())"],
                          capture_output=True, text=True, check=True)
    load = _loadavg()
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark child failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(reps=reps, n=n, M=M, d=d, chunk_size=chunk_size, python_baseline_mib=float(base.stdout),
               load_before=load, load_after=_loadavg())
    return out


def bench_kernel(N=8000, d=8, rounds=7) -> dict:
    """One gradient evaluation (margins, sigmoid, ``X^T s``) of one replication: the NumPy
    evaluation fit_bt uses (transposed rows) against a fused numba loop over rows."""
    try:
        import numba
    except ImportError:
        return {"skipped": "numba is not installed"}
    import math

    @numba.njit(fastmath=True, cache=False)
    def fused(X, theta, c, out):  # pragma: no cover - compiled
        rows, dd = X.shape
        for j in range(dd):
            out[j] = 0.0
        for r in range(rows):
            m = 0.0
            for j in range(dd):
                m += X[r, j] * theta[j]
            cs = c / (1.0 + math.exp(-m))
            for j in range(dd):
                out[j] += cs * X[r, j]

    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, d))
    XT = np.ascontiguousarray(X.T)
    theta = 0.3 * rng.normal(size=d)
    out = np.zeros(d)

    def numpy_eval():
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(-(theta @ XT)))
        return XT @ s

    compile_s = _first_call(lambda: fused(X, theta, 1.0, out))
    reps = 200
    times = _interleaved({"numpy": lambda: [numpy_eval() for _ in range(reps)],
                          "numba": lambda: [fused(X, theta, 1.0, out) for _ in range(reps)]}, rounds)
    err = float(np.max(np.abs(out - numpy_eval())))
    return {"N": N, "d": d, "numpy_us": 1e6 * min(times["numpy"]) / reps, "numba_us": 1e6 * min(times["numba"]) / reps,
            "numba_speedup": _ratio(times["numpy"], times["numba"]), "compile_s": compile_s, "max_abs_diff": err,
            "numba": numba.__version__, "load": _loadavg()}


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
            f"python {platform.python_version()}")


# --------------------------------------------------------------------------- reporting


def _fmt_fit(r: dict) -> list[str]:
    lines = [f"[fit] R={r['R']} n={r['n']} N={r['N']} d={r['d']}, {r['rounds']} interleaved rounds, ppi_py on "
             f"{r['ppi_reps']} replications per round; load average {r['load_before']} -> {r['load_after']}"]
    for lam, x in r["lam"].items():
        pf = x["per_fit_ms"]
        lines.append(f"  lam={lam}:")
        for name, v in pf.items():
            lines.append(f"    {name:8s} per fit: min {v['min']:8.3f} ms   median {v['median']:8.3f} ms")
        if "ppi_over_fit_bt" in x:
            q = x["ppi_over_fit_bt"]
            lines.append(f"    warmed ppi_py / fit_bt      : {q['min']:6.1f}x (ratio of minima), median {q['median']:6.1f}x"
                         f"   max|theta diff| {x['max_abs_diff_ppi']:.1e}")
        if "max_abs_diff_ppi_at_ppi_lam" in x:
            lines.append(f"    fit_bt at ppi_py's own lam  : max|theta diff| {x['max_abs_diff_ppi_at_ppi_lam']:.1e} "
                         f"(ppi_py's lam in [{x['ppi_lam_range'][0]:.3f}, {x['ppi_lam_range'][1]:.3f}])")
        if "fit_bt_over_plain" in x:
            q = x["fit_bt_over_plain"]
            lines.append(f"    fit_bt / plain Newton       : {q['min']:6.2f}x (ratio of minima), median {q['median']:6.2f}x"
                         f"   max|theta diff| {x['max_abs_diff_plain']:.1e}")
        fc = ", ".join(f"{k} {v:.3f} s" for k, v in x["first_call_s"].items())
        lines.append(f"    start-up (first call in this process, not in the ratios): {fc}")
    return lines


def _fmt(key: str, r: dict) -> list[str]:
    """Printed lines of one part of the results."""
    if key == "fit":
        return _fmt_fit(r)
    if key == "first-fit":
        lines = ["[first-fit] fresh process -> first finished fit (import + first call; data made beforehand)"]
        for k, v in r.items():
            if "error" in v:
                lines.append(f"  {k:20s}: failed: {v['error']}")
            else:
                lines.append(f"  {k:20s}: {v['total_s']:7.2f} s (import {v['import_s']:.2f} s, first fit "
                             f"{v['first_fit_s']:.2f} s)")
        return lines
    if key == "scaling":
        R, n, N, d = r["shape"]
        return [f"[scaling] base R={R} n={n} N={N} d={d} lam={r['lam']}: {r['base_s']:.3f} s; load {r['load']}",
                "  " + "   ".join(f"time({k})/time(base) = {v['min']:.2f} (median {v['median']:.2f})"
                                  for k, v in r["ratio"].items())]
    if key == "memory":
        return [f"[memory] sweep R={r['reps']} n={r['n']} M={r['M']} d={r['d']} chunk={r['chunk_size']}: "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB (python + numpy/scipy/pandas {r['python_baseline_mib']:.0f} MiB; "
                f"target < 2048 MiB), {r['seconds']:.0f} s, {r['rows']} rows; load {r['load_before']} -> "
                f"{r['load_after']}"]
    if key == "kernel":
        if "skipped" in r:
            return [f"[kernel] skipped: {r['skipped']}"]
        return [f"[kernel] one gradient evaluation, N={r['N']} d={r['d']}: NumPy {r['numpy_us']:.1f} us, fused "
                f"numba {r['numba_us']:.1f} us -> numba speed-up {r['numba_speedup']['min']:.2f}x (bar: >= 2x; "
                f"compile {r['compile_s']:.1f} s); load {r['load']}"]
    return []


def write_markdown(results: dict, path, command: str) -> str:
    """The generated performance table (markdown) for the README; written to ``path``."""
    from vrpo_common.fileio import write_text

    rows = []
    if "fit" in results:
        f = results["fit"]
        shape = f"R = {f['R']}, n = {f['n']}, N = {f['N']}, d = {f['d']}"
        for lam, x in f["lam"].items():
            pf = x["per_fit_ms"]
            if "ppi_over_fit_bt" in x:
                q = x["ppi_over_fit_bt"]
                agree = f"max diff {x['max_abs_diff_ppi']:.1e}"
                if "max_abs_diff_ppi_at_ppi_lam" in x:
                    agree += f" ({x['max_abs_diff_ppi_at_ppi_lam']:.1e} at ppi_py's own lam)"
                rows.append((f"`fit_bt` vs warmed `ppi_py` loop, lam = {lam} ({shape})",
                             f"{q['min']:.1f}x (median {q['median']:.1f}x); {pf['fit_bt']['min']:.2f} vs "
                             f"{pf['ppi_py']['min']:.2f} ms per fit; {agree}",
                             ">= 8x, 1e-6" if lam != "0.0" else "-"))
            if "fit_bt_over_plain" in x:
                q = x["fit_bt_over_plain"]
                rows.append((f"`fit_bt` / plain NumPy Newton, lam = {lam}",
                             f"{q['min']:.2f}x (median {q['median']:.2f}x); max diff {x['max_abs_diff_plain']:.1e}",
                             "<= 1.5x" if lam == "1.0" else "-"))
            fc = x["first_call_s"]
            if "ppi_py" in fc:
                rows.append((f"first call in a warm process, lam = {lam} (start-up, not in the ratios)",
                             f"fit_bt {fc['fit_bt']:.3f} s, ppi_py {fc['ppi_py']:.3f} s", "-"))
    if "first-fit" in results:
        cells = ", ".join(f"{k} {v['total_s']:.2f} s" for k, v in results["first-fit"].items() if "total_s" in v)
        rows.append(("fresh process to first fit (import + first call)", cells, "reported"))
    if "scaling" in results:
        r = results["scaling"]
        R, n, N, d = r["shape"]
        rows.append((f"`fit_bt` cost when R / n / N / d doubles (base R = {R}, n = {n}, N = {N}, d = {d})",
                     " / ".join(f"{r['ratio'][k]['min']:.2f}x" for k in ("2R", "2n", "2N", "2d")), "about 2x (d: more)"))
    if "memory" in results:
        r = results["memory"]
        rows.append((f"peak RSS of a sweep R = {r['reps']:,}, n = {r['n']:,}, M = {r['M']}, d = {r['d']} "
                     f"(chunks of {r['chunk_size']})",
                     f"{r['peak_rss_mib']:.0f} MiB (Python with numpy, scipy, pandas imported: "
                     f"{r['python_baseline_mib']:.0f} MiB), {r['seconds']:.0f} s",
                     "< 2 GiB"))
    if "kernel" in results and "skipped" not in results["kernel"]:
        r = results["kernel"]
        rows.append(("fused numba gradient kernel vs the NumPy evaluation (one replication)",
                     f"{r['numba_speedup']['min']:.2f}x ({r['numba_us']:.0f} vs {r['numpy_us']:.0f} us)",
                     ">= 2x to be used"))
    loads = []
    for key in ("fit", "scaling", "memory", "kernel"):
        r = results.get(key, {})
        la = r.get("load_before") or r.get("load")
        if la:
            loads.append(f"{key} {la}")
    text = [
        "<!-- generated by `vrpo bench`; do not edit by hand -->",
        f"Generated by `{command}` on {results['machine']}; 1-minute/5-minute/15-minute load average at the start "
        f"of each part: {'; '.join(loads)}. Ratios are the ratio of the per-fit minima over interleaved rounds "
        "(median of per-round ratios in brackets).",
        "",
        "| benchmark | result | target |",
        "| --- | --- | --- |",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    out = "\n".join(text) + "\n"
    write_text(path, out)
    return out


def _thread_limit(threads):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext(), "not limited (threadpoolctl not installed)"
    if threads is None:
        import contextlib

        return contextlib.nullcontext(), "library defaults"
    return threadpool_limits(threads), f"{threads} BLAS/OpenMP thread(s) for every competitor"


BEGIN_MARK = "<!-- BEGIN generated: docs/performance.md -->"
END_MARK = "<!-- END generated -->"


def embed_in_readme(markdown_text: str, readme) -> None:
    """Replace the block between :data:`BEGIN_MARK` and :data:`END_MARK` in ``readme`` with
    the generated table (atomically), so the README's numbers are the run's."""
    from pathlib import Path

    from vrpo_common.fileio import write_text

    text = Path(readme).read_text()
    if BEGIN_MARK not in text or END_MARK not in text:
        raise ValueError(f"{readme}: markers {BEGIN_MARK!r} ... {END_MARK!r} not found")
    head, rest = text.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    write_text(readme, head + BEGIN_MARK + "\n" + markdown_text.rstrip("\n") + "\n" + END_MARK + tail)


def main(which=("fit", "scaling"), ppi_reps=20, rounds=5, memory_reps=10_000, R=200, markdown=None,
         command="vrpo bench", threads=1, readme=None) -> dict:
    """Run the chosen benchmarks, print each as it finishes, optionally write the markdown
    table (and embed it in ``readme`` between the generated-block markers)."""
    limit, how = _thread_limit(threads)
    with limit:
        return _main(which, ppi_reps, rounds, memory_reps, R, markdown, command, how, readme)


def _main(which, ppi_reps, rounds, memory_reps, R, markdown, command, threads, readme) -> dict:
    results = {"machine": machine() + f"; threads: {threads}"}
    print(f"machine: {results['machine']}", flush=True)
    runs = {"fit": lambda: bench_fit(R=R, ppi_reps=ppi_reps, rounds=rounds),
            "first-fit": bench_first_fit,
            "scaling": lambda: bench_scaling(rounds=rounds),
            "kernel": bench_kernel,
            "memory": lambda: bench_memory(reps=memory_reps)}
    for key, run in runs.items():
        if key in which:
            results[key] = run()
            print("\n".join(_fmt(key, results[key])), flush=True)
    if markdown:
        text = write_markdown(results, markdown, command)
        print(f"markdown table written to {markdown}")
        if readme:
            embed_in_readme(text, readme)
            print(f"embedded in {readme}")
    return results
