"""Typed, validated Monte Carlo experiment configuration.

Loadable from TOML (``.toml``) or YAML (``.yaml``/``.yml``, needs PyYAML) and
overridable from CLI flags; its resolved form (:meth:`ExperimentConfig.to_dict`)
is embedded in every result file.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .bandit import BanditSpec
from .data import AUX_PROMPTS
from .registry import AUX_MODELS, SCENARIOS

METHODS_HELP = "mle | vr (lam=1) | vr-auto (power-tuned lam) | vr:<lam> (fixed lam)"
BACKENDS = ("loky", "threading", "sequential", "dask", "ray")


def parse_method(spec: str):
    """``"mle"`` -> 0.0, ``"vr"`` -> 1.0, ``"vr-auto"`` -> "auto", ``"vr:0.5"`` -> 0.5."""
    if spec == "mle":
        return 0.0
    if spec == "vr":
        return 1.0
    if spec == "vr-auto":
        return "auto"
    name, _, arg = spec.partition(":")
    if name == "vr" and arg:
        try:
            lam = float(arg)
        except ValueError:
            pass
        else:
            if lam >= 0:
                return lam
    raise ValueError(f"unknown method {spec!r}; expected {METHODS_HELP}")


_INT_FIELDS = ("d", "K", "dx", "M", "reps", "seed", "n_pop", "n_eval", "chunk_size", "n_jobs")
_FLOAT_FIELDS = ("scale", "beta", "alpha")
_STR_FIELDS = ("name", "pi_ref", "aux_prompts", "backend", "output")
_STR_LISTS = ("scenarios", "g", "methods")


def _kind(v) -> str:
    return f"{v!r} ({type(v).__name__})"


def _check_types(cfg) -> None:
    """Field types, each error naming the field (config files: TOML ``10.0`` is a float,
    ``"0.05"`` a string; integers must be written as integers). NumPy scalars are
    converted to plain Python numbers."""

    def integer(f, v, what="an integer"):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            hint = f"; write {int(v)}" if isinstance(v, float) and v.is_integer() and abs(v) < 1e6 else ""
            raise ValueError(f"{f} must be {what}, got {_kind(v)}{hint}")
        return int(v)

    for f in _INT_FIELDS:
        object.__setattr__(cfg, f, integer(f, getattr(cfg, f)))
    for f in _FLOAT_FIELDS:
        v = getattr(cfg, f)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{f} must be a number, got {_kind(v)}")
        if not isinstance(v, (int, float)):
            object.__setattr__(cfg, f, float(v))
    for f in _STR_FIELDS:
        v = getattr(cfg, f)
        if not isinstance(v, str):
            raise ValueError(f"{f} must be a string, got {_kind(v)}")
    if not isinstance(cfg.progress, bool):
        raise ValueError(f"progress must be true or false, got {_kind(cfg.progress)}")
    for f in _STR_LISTS:
        for v in getattr(cfg, f):
            if not isinstance(v, str):
                raise ValueError(f"{f} must be a list of strings, got {_kind(v)} in {list(getattr(cfg, f))}")
    object.__setattr__(cfg, "n", tuple(integer("n", v, "a list of integers >= 2") for v in cfg.n))


@dataclass(frozen=True)
class ExperimentConfig:
    """One Monte Carlo sweep: scenarios x n grid x auxiliary models x methods.

    Fields that change results: everything but ``chunk_size``, ``n_jobs``,
    ``backend``, ``output`` and ``progress`` (see :meth:`identity`).
    """

    name: str = "default"
    scenarios: tuple[str, ...] = ("bt", "mixture:1.0")
    # the bandit's structure (defaults are BanditSpec's own)
    d: int = BanditSpec.d
    K: int = BanditSpec.K
    dx: int = BanditSpec.dx
    scale: float = BanditSpec.scale
    beta: float = BanditSpec.beta
    pi_ref: str = BanditSpec.pi_ref
    n: tuple[int, ...] = (250, 500, 1000, 2000)
    M: int = 4
    aux_prompts: str = "same"
    g: tuple[str, ...] = ("oracle", "noisy:1.0")
    methods: tuple[str, ...] = ("mle", "vr", "vr-auto")
    reps: int = 200
    seed: int = 0
    alpha: float = 0.05
    n_pop: int = 20000
    n_eval: int = 2000
    # execution only (do not change results)
    chunk_size: int = 50
    n_jobs: int = 1
    backend: str = "loky"
    output: str = "results/default.parquet"
    progress: bool = True
    _EXEC_FIELDS = ("chunk_size", "n_jobs", "backend", "output", "progress")

    def __post_init__(self):
        for tup in ("scenarios", "n", "g", "methods"):
            v = getattr(self, tup)
            if isinstance(v, (str, int, float)):
                v = (v,)
            try:
                object.__setattr__(self, tup, tuple(v))
            except TypeError:
                raise ValueError(f"{tup} must be a list, got {v!r}") from None
        _check_types(self)
        BanditSpec(d=self.d, K=self.K, dx=self.dx, scale=self.scale, beta=self.beta, pi_ref=self.pi_ref)
        if not self.scenarios:
            raise ValueError("scenarios must not be empty")
        for s in self.scenarios:
            SCENARIOS.get(SCENARIOS.parse(s)[0])
        for s in self.g:
            AUX_MODELS.get(AUX_MODELS.parse(s)[0])
        if not self.methods:
            raise ValueError("methods must not be empty")
        for m in self.methods:
            parse_method(m)
        if any(m != "mle" for m in self.methods) and not self.g:
            raise ValueError("VR methods need at least one auxiliary model in g")
        if not self.n or any(n < 2 for n in self.n):
            raise ValueError(f"n must be a non-empty list of integers >= 2, got {self.n}")
        if min(self.n) < self.d:
            raise ValueError(f"n must be >= d = {self.d} (fewer labelled pairs than parameters cannot identify "
                             f"theta), got n = {min(self.n)}")
        if len(set(self.n)) != len(self.n) or len(set(self.scenarios)) != len(self.scenarios):
            raise ValueError("n and scenarios must not contain duplicates")
        if self.M < 1:
            raise ValueError(f"M must be >= 1, got {self.M}")
        if self.aux_prompts not in AUX_PROMPTS:
            raise ValueError(f"aux_prompts must be one of {AUX_PROMPTS}, got {self.aux_prompts!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        if self.reps < 2:
            raise ValueError(f"reps must be >= 2 (Monte Carlo errors need replications), got {self.reps}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.n_pop < 100 or self.n_eval < 10:
            raise ValueError("n_pop must be >= 100 and n_eval >= 10")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.n_jobs == 0:
            raise ValueError("n_jobs must be >= 1, or negative for all cores but |n_jobs| - 1 (joblib), got 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if Path(self.output).suffix not in (".parquet", ".csv"):
            raise ValueError(f"output must end in .parquet or .csv, got {self.output!r}")

    @property
    def bandit_spec(self) -> BanditSpec:
        return BanditSpec(d=self.d, K=self.K, dx=self.dx, scale=self.scale, beta=self.beta, pi_ref=self.pi_ref,
                          seed=self.seed)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def identity(self) -> dict:
        """The fields that determine results (execution settings removed)."""
        return {k: v for k, v in self.to_dict().items() if k not in self._EXEC_FIELDS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **kw) -> "ExperimentConfig":
        return replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path) -> "ExperimentConfig":
        """Load from ``.toml`` or ``.yaml``/``.yml`` (a top-level table, or an ``[experiment]`` table)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: invalid TOML: {e}") from None
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: invalid YAML: {e}") from None
        else:
            raise ValueError(f"{path}: config must be .toml, .yaml or .yml")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a table of settings")
        if "experiment" in data and isinstance(data["experiment"], dict):
            data = data["experiment"]
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


