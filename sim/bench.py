"""Benchmarks, run side by side in one process and printed as ratios (never timed asserts).

1. ``fit``: batched :func:`vrpo.fit_bt` against a loop of ``ppi_py.ppi_logistic_pointestimate``
   (n = 2000, d = 8, N = 8000 fresh-prompt extra pairs, lam = 1, R replications):
   fits per second of each, their ratio, and the largest difference of the estimates.
2. ``scaling``: time of ``fit_bt`` at (n, R), (2n, R) and (n, 2R): ratios (about 2 each).
3. ``memory``: peak resident memory of a sweep (R = 10,000, n = 4,000, M = 4, d = 8) in a
   child process (opt-in: it runs for several minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from scipy.special import expit

import vrpo


def _problem(R, n, N, d, seed=0):
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


def _best_of(fn, repeat):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_fit(R=200, n=2000, N=8000, d=8, ppi_reps=None, repeat=3) -> dict:
    """Batched fit_bt vs a loop of ppi_py over ``ppi_reps`` (default all R) replications."""
    from ppi_py import ppi_logistic_pointestimate

    X, Z, g, Xa, ga = _problem(R, n, N, d)
    t_ours, res = _best_of(lambda: vrpo.fit_bt(X, Z, g, Xa, ga, lam=1.0), repeat)
    k = R if ppi_reps is None else min(ppi_reps, R)
    t0 = time.perf_counter()
    ref = np.stack([ppi_logistic_pointestimate(X[r], Z[r], g[r], Xa[r], ga[r], lam=1) for r in range(k)])
    t_ppi = time.perf_counter() - t0
    ours_fps, ppi_fps = R / t_ours, k / t_ppi
    return {"R": R, "n": n, "N": N, "d": d, "ppi_reps": k, "fit_bt_s": t_ours, "ppi_loop_s": t_ppi,
            "fit_bt_fits_per_s": ours_fps, "ppi_fits_per_s": ppi_fps, "speedup": ours_fps / ppi_fps,
            "max_abs_diff": float(np.max(np.abs(res.theta[:k] - ref))), "all_converged": bool(res.converged.all())}


def bench_scaling(R=100, n=2000, N=8000, d=8, repeat=3) -> dict:
    """Time of fit_bt when n (and N with it) doubles and when R doubles."""
    out = {}
    for key, (r, m, mm) in {"base": (R, n, N), "2n": (R, 2 * n, 2 * N), "2R": (2 * R, n, N)}.items():
        X, Z, g, Xa, ga = _problem(r, m, mm, d, seed=1)
        out[key] = _best_of(lambda: vrpo.fit_bt(X, Z, g, Xa, ga, lam=1.0), repeat)[0]
    return {"base_s": out["base"], "ratio_2n": out["2n"] / out["base"], "ratio_2R": out["2R"] / out["base"],
            "R": R, "n": n, "N": N, "d": d}


_MEMORY_CHILD = r"""
import json, resource, sys, time
from sim import ExperimentConfig, run_experiment
cfg = ExperimentConfig(**json.loads(sys.argv[1]))
t = time.perf_counter()
df = run_experiment(cfg, write=False)
print(json.dumps({"rows": len(df), "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_memory(reps=10_000, n=4000, M=4, d=8, chunk_size=50) -> dict:
    """Peak RSS of a sweep in a fresh child process (one scenario, oracle g, MLE and VR)."""
    cfg = dict(scenarios=["mixture:1.0"], n=[n], M=M, d=d, reps=reps, g=["oracle"], methods=["mle", "vr"],
               chunk_size=chunk_size, progress=False, n_eval=500)
    base = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrusage(resource.RUSAGE_SELF)"
                           ".ru_maxrss / 1024)"], capture_output=True, text=True, check=True)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory benchmark child failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(reps=reps, n=n, M=M, d=d, chunk_size=chunk_size, python_baseline_mib=float(base.stdout))
    return out


def machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}"


def main(which=("fit", "scaling"), ppi_reps=None, memory_reps=10_000) -> dict:
    print(f"machine: {machine()}")
    results = {}
    if "fit" in which:
        r = results["fit"] = bench_fit(ppi_reps=ppi_reps)
        print(f"[fit] R={r['R']} n={r['n']} N={r['N']} d={r['d']} lam=1")
        print(f"  vrpo.fit_bt (batched)      : {r['fit_bt_s']:8.3f} s  -> {r['fit_bt_fits_per_s']:9.1f} fits/s")
        print(f"  ppi_py loop ({r['ppi_reps']:4d} fits)   : {r['ppi_loop_s']:8.3f} s  -> {r['ppi_fits_per_s']:9.1f} fits/s")
        print(f"  speed-up (fits/s ratio)    : {r['speedup']:8.1f} x   (target >= 50 x)")
        print(f"  max |theta_ours - theta_ppi| = {r['max_abs_diff']:.2e}  (target <= 1e-6)")
    if "scaling" in which:
        r = results["scaling"] = bench_scaling()
        print(f"[scaling] base R={r['R']} n={r['n']} N={r['N']}: {r['base_s']:.3f} s")
        print(f"  time(2n) / time(n) = {r['ratio_2n']:.2f}   time(2R) / time(R) = {r['ratio_2R']:.2f}   (about 2 expected)")
    if "memory" in which:
        r = results["memory"] = bench_memory(reps=memory_reps)
        print(f"[memory] sweep R={r['reps']} n={r['n']} M={r['M']} d={r['d']} chunk={r['chunk_size']}: "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB (bare python {r['python_baseline_mib']:.0f} MiB; target < 2048 MiB), "
              f"{r['seconds']:.0f} s, {r['rows']} rows")
    return results


