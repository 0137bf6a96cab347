"""Monte Carlo runner: batched, chunked, parallel, resumable, reproducible.

A *cell* is one ``(scenario, n)`` of the sweep; within it every replication
draws one data set that all auxiliary models and methods share (common random
numbers, so method differences have small Monte Carlo error). Replication ``r``
of cell ``(s, n)`` uses generators seeded by
``SeedSequence(seed, spawn_key=(crc32(s), n, r, stream))``: results do not depend
on the chunk size, the number of workers or the joblib backend.

Finished cells are cached (``<output>.cells/<key>.parquet``, written
atomically), so an interrupted sweep recomputes only the missing cells. A cell's
key covers everything that produced it: the result-changing configuration, the
cell, and a fingerprint of the code (:func:`code_fingerprint`: the source of
``vrpo/`` and ``sim/``, and of the files defining the scenario and auxiliary-model
classes in use, plugins included, plus the NumPy and SciPy versions). Each cell
file stores its own key and cell; a file whose stored identity or contents do not
match the cell it is read for is rejected (warned about and recomputed), as is an
unreadable one. The final table has one row per scenario x n x g x method x
replication and carries the resolved configuration (parquet schema metadata
``vrpo_config``, or ``#`` header lines in CSV).

Plugin scenarios and auxiliary models travel to worker processes with each task
(by value where their module cannot be imported there), and a worker started by
the sweep exits when the process that started it dies.
"""

from __future__ import annotations

import ast
import hashlib
import json
import marshal
import os
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import vrpo

from .aux_models import make_aux
from .bandit import Bandit
from .config import ExperimentConfig, parse_method
from .data import PairData, sample_pairs
from vrpo_common.fileio import read_results, write_table  # re-exported: the runner's result files
from .policy import LinearPolicies
from .population import Population, make_population
from .registry import AUX_MODELS, SCENARIOS
from .scenarios import make_scenario

__all__ = ["run_experiment", "run_cell_chunk", "read_results", "write_table", "populations", "population_rng",
           "eval_contexts", "code_fingerprint", "check_output"]

_STREAM_DATA = 0
_STREAM_POP = 0x9E3779B1


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


def rep_generator(seed: int, scenario: str, n: int, rep: int, stream: int) -> np.random.Generator:
    """The generator of one replication's stream (data: 0; auxiliary model ``g``: ``1 + crc32(g)``)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_crc(scenario), n, rep, stream)))


def population_rng(cfg: ExperimentConfig, scenario: str) -> np.random.Generator:
    """The generator of ``scenario``'s population: ``n_pop`` contexts for ``theta*``, then
    the ``n_eval`` evaluation contexts (see :func:`sim.population.make_population`)."""
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(_crc(scenario), _STREAM_POP)))


def eval_contexts(cfg: ExperimentConfig, scenario: str):
    """The evaluation contexts of ``scenario`` without refitting ``theta*``."""
    bandit = Bandit(cfg.bandit_spec)
    rng = population_rng(cfg, scenario)
    bandit.sample_contexts(rng, cfg.n_pop)  # the theta* contexts come first in the stream
    return bandit.sample_contexts(rng, cfg.n_eval)


_POPULATIONS: dict = {}  # memo of make_population within a process (the figure sweeps share scenarios)
_POPULATIONS_MAX = 32


def populations(cfg: ExperimentConfig) -> dict[str, Population]:
    """``theta*`` and evaluation sets per scenario (deterministic in ``cfg.seed``).

    Memoised within the process on everything they depend on: the bandit (seed
    included), the scenario spec, ``n_pop``, ``n_eval``, the scenario's class and the
    digest of the files defining it."""
    bandit = Bandit(cfg.bandit_spec)
    out = {}
    for s in cfg.scenarios:
        cls = SCENARIOS.get(SCENARIOS.parse(s)[0])
        files, loose = _class_sources(cls)
        key = (cfg.bandit_spec, s, cfg.n_pop, cfg.n_eval, cls,
               tuple(_file_digest(f) for f in sorted(files)), tuple(marshal.dumps(c) for c in loose))
        if key not in _POPULATIONS:
            if len(_POPULATIONS) >= _POPULATIONS_MAX:
                _POPULATIONS.pop(next(iter(_POPULATIONS)))
            _POPULATIONS[key] = make_population(make_scenario(s, bandit), bandit, population_rng(cfg, s), cfg.n_pop,
                                                cfg.n_eval)
        out[s] = _POPULATIONS[key]
    return out


@dataclass
class _Task:
    scenario: str
    n: int
    lo: int
    hi: int
    # registry entries the chunk needs ({"scenario"|"aux": {name: class}}), so plugins
    # registered in the parent work in worker processes
    classes: dict = field(default_factory=dict)
    parent_pid: int | None = None  # a worker started by this process exits when it dies


def _task_classes(cfg: ExperimentConfig, scenario: str) -> dict:
    return {"scenario": {SCENARIOS.parse(scenario)[0]: SCENARIOS.get(SCENARIOS.parse(scenario)[0])},
            "aux": {AUX_MODELS.parse(g)[0]: AUX_MODELS.get(AUX_MODELS.parse(g)[0]) for g in cfg.g}}


def _ensure_registered(classes: dict) -> None:
    """Register the parent's classes in this (worker) process where they differ."""
    for kind, reg in (("scenario", SCENARIOS), ("aux", AUX_MODELS)):
        for name, obj in classes.get(kind, {}).items():
            if name not in reg or reg.get(name) is not obj:
                reg.register(name, overwrite=True)(obj)


_WATCHDOG: threading.Thread | None = None


def _watch_parent(parent_pid: int | None) -> None:
    """In a worker process started by the sweep (``parent_pid`` is its parent): exit as
    soon as that parent dies (e.g. SIGKILL), instead of computing on for nobody."""
    global _WATCHDOG
    if parent_pid is None or _WATCHDOG is not None or os.getppid() != parent_pid:
        return  # the sweep's own process, a thread, or a worker of a cluster (dask, ray)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.25)
        os._exit(1)  # the parent is gone (we were re-parented)

    _WATCHDOG = threading.Thread(target=watch, name="vrpo-parent-watchdog", daemon=True)
    _WATCHDOG.start()


def _metrics(res: vrpo.FitResult, pop: Population, mle_opponent, alpha, beta) -> dict:
    """Per-replication metrics of docs/method.md s4 for a batch of fits (``mle_opponent``: the
    same replications' MLE policies as win-rate opponents, :meth:`LinearPolicies.opponent`)."""
    th = res.theta  # (R, d)
    ts = pop.theta_star
    pol = LinearPolicies(th, pop.ctx.phi, pop.ctx.log_pi_ref, beta)  # (R, E, K) policies, computed once
    ci = res.conf_int(alpha)  # (R, d, 2)
    covered = (ci[..., 0] <= ts) & (ts <= ci[..., 1])  # (R, d)
    P_ref = pop.P_ref if pop.P_ref is not None else np.matmul(pop.P, pop.ctx.pi_ref[..., None])[..., 0]
    out = {
        "lam": res.lam,
        "converged": res.converged,
        "status": res.status,
        "n_iter": res.n_iter,
        "err": np.linalg.norm(th - ts, axis=-1),
        "regret": pol.regret(pop.log_pi_star),
        "regret_u": pol.regret(pop.log_pi_u) if pop.log_pi_u is not None else np.full(len(th), np.nan),
        "win_ref": pol.win_rate_vs_fixed(P_ref),
        "win_mle": pol.win_rate_vs(mle_opponent),
        "cover_frac": covered.mean(axis=-1),
        "cover_all": covered.all(axis=-1),
        "ci_width": (ci[..., 1] - ci[..., 0]).mean(axis=-1),
    }
    for j in range(th.shape[-1]):
        out[f"theta_{j}"] = th[:, j]
    for j in range(th.shape[-1]):
        out[f"se_{j}"] = res.se[:, j]
    return out


def run_cell_chunk(cfg: ExperimentConfig, task: _Task, pop: Population) -> pd.DataFrame:
    """Replications ``task.lo .. task.hi - 1`` of one cell, all methods and ``g``."""
    _watch_parent(task.parent_pid)
    _ensure_registered(task.classes)
    bandit = Bandit(cfg.bandit_spec)
    scen = make_scenario(task.scenario, bandit)
    reps = range(task.lo, task.hi)
    data = PairData.stack([
        sample_pairs(rep_generator(cfg.seed, task.scenario, task.n, r, _STREAM_DATA), bandit, scen, task.n, cfg.M,
                     cfg.aux_prompts)
        for r in reps
    ])
    X, Z = data.X, data.Z
    mle = vrpo.fit_bt(X, Z, lam=0, warn=False)
    mle_opponent = LinearPolicies(mle.theta, pop.ctx.phi, pop.ctx.log_pi_ref, bandit.beta).opponent(pop.P)
    frames = []

    def emit(g_name, method, res):
        m = _metrics(res, pop, mle_opponent, cfg.alpha, bandit.beta)
        k = task.hi - task.lo
        cols = {"scenario": [task.scenario] * k, "kappa": np.full(k, scen.kappa), "n": np.full(k, task.n),
                "M": np.full(k, cfg.M), "aux_prompts": [cfg.aux_prompts] * k, "g": [g_name] * k, "method": [method] * k,
                "rep": np.arange(task.lo, task.hi)}
        frames.append(pd.DataFrame({**cols, **m}))  # one construction (column inserts copied the frame each time)

    if "mle" in cfg.methods:
        emit("none", "mle", mle)
    vr_methods = [m for m in cfg.methods if m != "mle"]
    if vr_methods:
        Xa = data.X_aux
        for g_spec in cfg.g:
            aux = make_aux(g_spec, scen)
            rngs = [rep_generator(cfg.seed, task.scenario, task.n, r, 1 + _crc(g_spec)) for r in reps]
            g, ga = aux(data, rngs)
            for method in vr_methods:
                res = vrpo.fit_bt(X, Z, g, Xa, ga, lam=parse_method(method), theta0=mle.theta, warn=False)
                emit(g_spec, method, res)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- I/O




# --------------------------------------------------------------------------- driver


_PACKAGES = ("vrpo", "sim")  # the code every cell runs


def _normalised_source(path: Path) -> bytes:
    """A file's code without comments, docstrings or formatting (its AST), so editing
    prose does not invalidate caches; the raw bytes where it does not parse."""
    raw = path.read_bytes()
    try:
        tree = ast.parse(raw)
    except (SyntaxError, ValueError):
        return raw
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


_DIGESTS: dict = {}  # (path, mtime_ns, size) -> digest of the normalised source


def _file_digest(path: Path) -> bytes:
    """SHA-1 of :func:`_normalised_source`, cached per file version (parsing every module
    for every cell of every sweep took a second per sweep)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha1(_normalised_source(path)).digest()
    return _DIGESTS[key]


def _class_sources(cls) -> tuple[set, list]:
    """Files defining ``cls`` and its bases (via their methods' code objects, which works
    for plugins loaded from a path), and the code objects of methods defined without a
    file (e.g. in ``python -c``)."""
    files, loose = set(), []
    for klass in cls.__mro__ if isinstance(cls, type) else (cls,):
        if klass is object:
            continue
        members = vars(klass).values() if isinstance(klass, type) else (klass,)
        for obj in members:
            obj = getattr(obj, "__func__", obj)  # staticmethod / classmethod
            objs = [obj.fget, obj.fset] if isinstance(obj, property) else [obj]
            for f in objs:
                code = getattr(f, "__code__", None)
                if code is None:
                    continue
                p = Path(code.co_filename)
                if p.is_file():
                    files.add(p.resolve())
                else:
                    loose.append(code)
    return files, loose


def code_fingerprint(cfg: ExperimentConfig, scenario: str) -> str:
    """Hash of the code that produces ``scenario``'s cells under ``cfg``.

    Covers every module of ``vrpo/`` and ``sim/`` (estimator, data, bandit, policy,
    metrics), the files that define the scenario class and each auxiliary-model class
    of ``cfg.g`` (plugin files included, with their base classes), and the NumPy and
    SciPy versions (random streams, special functions). Comments and docstrings do
    not count.
    """
    import scipy

    files: set = set()
    for pkg in _PACKAGES:
        files.update(p.resolve() for p in (Path(__file__).resolve().parents[1] / pkg).glob("*.py"))
    loose: list = []
    for cls in [SCENARIOS.get(SCENARIOS.parse(scenario)[0])] + [AUX_MODELS.get(AUX_MODELS.parse(g)[0]) for g in cfg.g]:
        f, c = _class_sources(cls)
        files |= f
        loose += c
    h = hashlib.sha1(f"numpy {np.__version__} scipy {scipy.__version__} vrpo {vrpo.__version__}".encode())
    for p in sorted(files):
        h.update(p.name.encode())
        h.update(_file_digest(p))
    for code in loose:
        h.update(marshal.dumps(code))
    return h.hexdigest()[:16]


def _cell_hash(cfg: ExperimentConfig, scenario: str, n: int, code: str | None = None) -> str:
    """The cache key of cell ``(scenario, n)``: result-changing config + cell + code."""
    ident = cfg.identity()
    ident.pop("scenarios")
    ident.pop("n")
    ident.update(scenario=scenario, n=n, version=vrpo.__version__,
                 code=code if code is not None else code_fingerprint(cfg, scenario))
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _read_cell(path: Path, cfg: ExperimentConfig, cell: tuple, key: str) -> pd.DataFrame | None:
    """The cached cell at ``path`` if its stored identity and its contents are ``cell``'s;
    otherwise ``None`` with a warning (the cell is then recomputed)."""
    try:
        df, meta = read_results(path)
    except Exception as e:  # noqa: BLE001 - any unreadable cache file is recomputed
        warnings.warn(f"cached cell file {path} is unreadable ({type(e).__name__}: {e}); recomputing cell {cell}",
                      stacklevel=3)
        return None
    want = [cell[0], int(cell[1])]
    problem = None
    if meta.get("key") != key or meta.get("cell") != want:
        problem = f"holds cell {meta.get('cell')} with key {meta.get('key')}, not cell {want} with key {key}"
    else:
        methods = [("none", "mle")] if "mle" in cfg.methods else []
        methods += [(g, m) for g in cfg.g for m in cfg.methods if m != "mle"]
        expect = len(methods) * cfg.reps
        if (len(df) != expect or set(df["scenario"]) != {cell[0]} or set(df["n"]) != {int(cell[1])}
                or set(zip(df["g"], df["method"])) != set(methods)
                or not all(sorted(r) == list(range(cfg.reps)) for _, r in df.groupby(["g", "method"])["rep"])):
            problem = f"has contents that are not cell {want} ({len(df)} rows, {expect} expected)"
    if problem:
        warnings.warn(f"cached cell file {path} {problem}: rejected, recomputing", stacklevel=3)
        return None
    return df


def _cells_dir(cfg: ExperimentConfig) -> Path:
    out = Path(cfg.output)
    return out.with_name(out.stem + ".cells")


def _parallel_results(cfg: ExperimentConfig, tasks, pops):
    """Yield chunk results in task order, using the configured joblib backend."""
    if cfg.backend == "sequential" or cfg.n_jobs == 1:
        for t in tasks:
            yield run_cell_chunk(cfg, t, pops[t.scenario])
        return
    import joblib

    cluster = client = None
    if cfg.backend == "dask":
        from distributed import Client, LocalCluster

        try:
            from distributed import get_client

            client = get_client()
        except ValueError:  # no client yet: start a local cluster
            n = cfg.n_jobs if cfg.n_jobs > 0 else os.cpu_count()
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
    elif cfg.backend == "ray":
        from ray.util.joblib import register_ray

        register_ray()
    try:
        with joblib.parallel_config(backend=cfg.backend, n_jobs=cfg.n_jobs):
            par = joblib.Parallel(return_as="generator")
            yield from par(joblib.delayed(run_cell_chunk)(cfg, t, pops[t.scenario]) for t in tasks)
    finally:
        if cluster is not None:
            client.close()
            cluster.close()


def _canonical_order(df: pd.DataFrame, cfg: ExperimentConfig) -> pd.DataFrame:
    """Rows of a cell ordered by (g, method, rep) as listed in the config, whatever the chunking."""
    g_rank = {g: i for i, g in enumerate(("none",) + tuple(cfg.g))}
    m_rank = {m: i for i, m in enumerate(cfg.methods)}
    key = df["g"].map(g_rank) * 10**9 + df["method"].map(m_rank) * 10**7 + df["rep"]
    return df.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def check_output(cfg: ExperimentConfig) -> Path:
    """``cfg.output`` if a results table can be written there; a clear ``ValueError`` before
    any work otherwise (wrong suffix, a directory, a parent that is a file)."""
    out = Path(cfg.output)
    if out.suffix not in (".parquet", ".csv"):
        raise ValueError(f"output must end in .parquet or .csv, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a directory; give a file name ending in .parquet or .csv")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"output {str(out)!r}: {str(parent)!r} is a file, not a directory")
    if _cells_dir(cfg).exists() and not _cells_dir(cfg).is_dir():
        raise ValueError(f"cell cache {str(_cells_dir(cfg))!r} is a file, not a directory")
    return out


def run_experiment(cfg: ExperimentConfig, *, write: bool = True, resume: bool = True) -> pd.DataFrame:
    """Run the sweep of ``cfg``; returns the tidy table (and writes it to ``cfg.output``)."""
    from tqdm.auto import tqdm

    if write:
        check_output(cfg)
    t0 = time.time()
    pops = populations(cfg)
    cells_dir = _cells_dir(cfg)
    cells = [(s, n) for s in cfg.scenarios for n in cfg.n]
    codes = {s: code_fingerprint(cfg, s) for s in cfg.scenarios}
    keys = {(s, n): _cell_hash(cfg, s, n, codes[s]) for s, n in cells}
    done: dict[tuple, pd.DataFrame] = {}
    if resume and write and cells_dir.exists():
        for c in cells:
            f = cells_dir / f"{keys[c]}.parquet"
            if f.exists():
                df = _read_cell(f, cfg, c, keys[c])
                if df is not None:
                    done[c] = df
    missing = [c for c in cells if c not in done]
    classes = {s: _task_classes(cfg, s) for s in cfg.scenarios}
    tasks = [_Task(s, n, lo, min(lo + cfg.chunk_size, cfg.reps), classes[s], os.getpid()) for s, n in missing
             for lo in range(0, cfg.reps, cfg.chunk_size)]
    per_cell = {c: [] for c in missing}
    n_chunks = {c: sum(1 for t in tasks if (t.scenario, t.n) == c) for c in missing}
    bar = tqdm(total=len(tasks), desc=f"vrpo {cfg.name}", unit="chunk", disable=not cfg.progress)
    if done:
        bar.write(f"resuming: {len(done)} of {len(cells)} cells read from {cells_dir}")
    for t, df in zip(tasks, _parallel_results(cfg, tasks, pops)):
        c = (t.scenario, t.n)
        per_cell[c].append(df)
        bar.update(1)
        if len(per_cell[c]) == n_chunks[c]:
            done[c] = _canonical_order(pd.concat(per_cell.pop(c), ignore_index=True), cfg)
            if write:
                write_table(done[c], cells_dir / f"{keys[c]}.parquet",
                            {"config": cfg.identity(), "cell": [c[0], int(c[1])], "key": keys[c], "code": codes[c[0]]})
    bar.close()
    df = pd.concat([done[c] for c in cells], ignore_index=True)
    if write:
        write_table(df, cfg.output, result_metadata(cfg, pops, elapsed=time.time() - t0, codes=codes))
    return df


def result_metadata(cfg: ExperimentConfig, pops: dict, elapsed: float | None = None, codes: dict | None = None) -> dict:
    """Resolved configuration plus each scenario's ``theta*`` and its Monte Carlo error,
    and the code fingerprint per scenario (:func:`code_fingerprint`)."""
    return {
        "config": cfg.to_dict(),
        "theta_star": {s: p.theta_star.tolist() for s, p in pops.items()},
        "theta_star_se": {s: p.theta_star_se.tolist() for s, p in pops.items()},
        "vrpo_version": vrpo.__version__,
        "code_fingerprint": codes if codes is not None else {s: code_fingerprint(cfg, s) for s in cfg.scenarios},
        "elapsed_s": elapsed,
    }
