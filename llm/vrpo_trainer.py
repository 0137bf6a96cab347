"""VRPO as a TRL trainer: ``VRPOConfig(trl.DPOConfig)`` and ``VRPOTrainer(trl.DPOTrainer)``.

Constructed exactly like ``DPOTrainer``; everything of ``transformers.Trainer`` (accelerate
data parallel, DeepSpeed/FSDP, PEFT adapters, logging integrations, checkpoints and
``train(resume_from_checkpoint=...)``) comes from TRL. What this module adds (guide:
docs/vrpo_trainer.md):

- data: TRL's ``prompt, chosen, rejected`` plus the extra responses ``a_1, a_2`` from
  ``pi_ref`` (one or ``M`` per example) and the auxiliary probabilities ``g``, ``g_aux``,
  validated before training (one error naming the column and row, nothing repaired);
  pre-tokenised ``*_ids`` columns skip tokenisation;
- the loss: :func:`llm.vrpo_loss.vrpo_loss`, i.e. :func:`vrpo.loss.vr_objective` on the
  DPO margins, with ``lam`` fixed or power-tuned online (``"auto"``), ``g`` from columns, a
  preference model, a frozen copy of the policy or a constant;
- the shared-prompt forward (:func:`llm.vrpo_loss.sequence_logps`), which TRL lacks;
- a light step: no fused-head side outputs and no per-step host syncs for metrics;
- checkpoints that carry the VRPO settings, a fingerprint of the data, the reference
  log-probs, the ``lam`` moments and the frozen ``g`` model; a resume onto other data,
  settings or ``pi_ref`` fails with a clear error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from transformers.data.data_collator import DataCollatorMixin
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from vrpo_common.fileio import write_json

from .vrpo_loss import PowerTuning, pad_batch, pair_margins, self_g, sequence_logps, soft_label, vrpo_loss

__all__ = ["VRPOConfig", "VRPOTrainer", "DataCollatorForVRPO", "NonFiniteError", "G_SOURCES", "LOSS_TYPES"]

G_SOURCES = ("columns", "model", "self", "constant")
LOSS_TYPES = ("sigmoid", "robust")
STATE_FILE, REF_FILE, SELF_G_FILE = "vrpo_state.json", "vrpo_ref_logps.safetensors", "vrpo_self_g.safetensors"
# the paper's reference code: per-response probabilities of the two members of a pair
ALIASES = {"chosen_preference": ("g", "rejected_preference"), "a_1_preference": ("g_aux", "a_2_preference")}
ALIAS_ATOL = 1e-6  # float32 storage of p and 1 - p
logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss (stopped before the optimizer step)."""


@dataclass
class VRPOConfig(DPOConfig):
    r"""Configuration of :class:`VRPOTrainer`: every ``trl.DPOConfig`` field plus the VRPO ones.

    lam (`float` or `"auto"`, defaults to `1.0`): weight of the control variate; `0` is DPO,
        `1` the paper's VRPO, `"auto"` power tuning online (clipped to [0, 1], logged as `lam`).
    lam_auto_decay (`float`, defaults to `0.99`): per-step decay of the moments behind `"auto"`
        (`1.0`: plain running sums).
    g_source (`str`, defaults to `"columns"`): `"columns"` (`g`, `g_aux` in the data), `"model"`
        (the trainer's `g_model(prompts, a, b) -> P(a > b)`, evaluated once on the text),
        `"self"` (a frozen copy of the policy refreshed every `self_g_refresh` steps,
        `g = sigma(delta_frozen)`), `"constant"` (`g = 1/2`).
    shared_prompt (`bool`, defaults to `True`): encode each prompt once and continue its KV
        cache with all responses (needs `gradient_checkpointing=False`).
    max_prompt_length, max_completion_length (`int`, optional): keep the last prompt tokens /
        the first tokens of every response (applied after tokenisation, before `max_length`).
    label_smoothing (`float`, defaults to `0.0`): `eps` in [0, 0.5). With `loss_type="sigmoid"`:
        conservative DPO, soft label `1 - eps` on the labelled pair (TRL 1.16's sigmoid ignores
        it); with `"robust"`: robust DPO, label `(1 - eps) / (1 - 2 eps)` (equal to TRL's).
    loss_type: `"sigmoid"` or `"robust"` (the losses linear in the label, so VR keeps its target).
    gradient_checkpointing: off by default here (`True` in DPOConfig).
    """

    lam: float | str = field(default=1.0, metadata={"help": "control-variate weight >= 0, or 'auto'"})
    lam_auto_decay: float = field(default=0.99, metadata={"help": "per-step decay of the lam='auto' moments"})
    g_source: str = field(default="columns", metadata={"help": "columns | model | self | constant"})
    self_g_refresh: int = field(default=20, metadata={"help": "steps between refreshes of the frozen g model"})
    shared_prompt: bool = field(default=True, metadata={"help": "encode each prompt once for all responses"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "keep the last prompt tokens"})
    max_completion_length: int | None = field(default=None, metadata={"help": "keep the first response tokens"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "incompatible with shared_prompt"})

    def __post_init__(self):
        if isinstance(self.lam, str) and self.lam != "auto":
            try:  # a number from a command line
                self.lam = float(self.lam)
            except ValueError:
                raise ValueError(f"lam must be a number >= 0 or 'auto', got {self.lam!r}") from None
        if self.lam != "auto" and (isinstance(self.lam, bool) or not isinstance(self.lam, (int, float))
                                   or not math.isfinite(self.lam) or self.lam < 0):
            raise ValueError(f"lam must be a finite number >= 0 or 'auto', got {self.lam!r}")
        if not 0 < self.lam_auto_decay <= 1:
            raise ValueError(f"lam_auto_decay must be in (0, 1], got {self.lam_auto_decay}")
        if self.g_source not in G_SOURCES:
            raise ValueError(f"g_source must be one of {G_SOURCES}, got {self.g_source!r}")
        if int(self.self_g_refresh) < 1:
            raise ValueError(f"self_g_refresh must be >= 1, got {self.self_g_refresh}")
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if len(losses) != 1 or losses[0] not in LOSS_TYPES:
            raise ValueError(f"VRPOTrainer supports one loss_type from {LOSS_TYPES}, got {losses}: the VR "
                             "correction needs a loss linear in the label")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        for name in ("max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")
        unsupported = {"ld_alpha": self.ld_alpha is not None, "use_weighting": self.use_weighting,
                       "f_divergence_type": self.f_divergence_type != "reverse_kl",
                       "loss_weights": self.loss_weights not in (None, [1.0]),
                       "truncation_mode": self.truncation_mode != "keep_start"}
        if any(unsupported.values()):
            raise ValueError(f"VRPOTrainer does not support these DPOConfig settings: "
                             f"{[k for k, v in unsupported.items() if v]} (keep their defaults)")
        super().__post_init__()
        if self.shared_prompt and self.activation_checkpointing:
            raise ValueError("shared_prompt=True needs the KV cache, which gradient checkpointing disables: "
                             "set gradient_checkpointing=False or shared_prompt=False")

    def vrpo_settings(self) -> dict:
        """The settings that define the objective (stored in, and checked against, checkpoints)."""
        keys = ("lam", "lam_auto_decay", "g_source", "self_g_refresh", "shared_prompt", "max_prompt_length",
                "max_completion_length", "max_length", "beta", "loss_type", "label_smoothing")
        return {k: getattr(self, k) for k in keys}


@dataclass
class DataCollatorForVRPO(DataCollatorMixin):
    """Pads prepared rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``a_1_ids``/``a_2_ids``
    with M lists each, ``g``, ``g_aux``, ``ref_logps``) into :func:`llm.vrpo_loss.pad_batch` tensors
    plus ``g`` (B,), ``g_aux`` (B, M), ``ref_logps`` (B, K). ``n_extra = 0``: DPO (K = 2).
    Responses are cut to ``max_length - len(prompt)`` tokens (TRL's ``keep_start``)."""

    pad_token_id: int
    shared_prompt: bool = True
    n_extra: int = 0
    max_length: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts, responses = [], []
        for ex in examples:
            rs = [ex["chosen_ids"], ex["rejected_ids"]]
            for m in range(self.n_extra):
                rs += [ex["a_1_ids"][m], ex["a_2_ids"][m]]
            if self.max_length is not None:
                rs = [r[: self.max_length - len(ex["prompt_ids"])] for r in rs]
            prompts.append(ex["prompt_ids"])
            responses.append(rs)
        out = pad_batch(prompts, responses, self.pad_token_id, self.shared_prompt)
        K = 2 + 2 * self.n_extra
        if "ref_logps" in examples[0]:
            out["ref_logps"] = torch.tensor([ex["ref_logps"][:K] for ex in examples], dtype=torch.float32)
        if self.n_extra and "g" in examples[0]:
            out["g"] = torch.tensor([ex["g"] for ex in examples], dtype=torch.float32)  # (B,)
            out["g_aux"] = torch.tensor([ex["g_aux"][: self.n_extra] for ex in examples], dtype=torch.float32)
        return out


# ---------------------------------------------------------------------------------------- data checks
def _fail(name: str, col: str, row: int, msg: str, n_bad: int = 1):
    more = f" ({n_bad} rows in all)" if n_bad > 1 else ""
    raise ValueError(f"{name} dataset, column {col!r}, row {row}: {msg}{more}. Nothing was repaired: fix the data.")


def _probabilities(name: str, col: str, values: list) -> None:
    """Every value a real number in [0, 1] (lists allowed: one per extra pair)."""
    bad = []
    for i, v in enumerate(values):
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)) \
                    or not 0 <= x <= 1:  # NaN fails the comparison too
                bad.append((i, x))
                break
    if bad:
        _fail(name, col, bad[0][0], f"{bad[0][1]!r} is not a probability in [0, 1]", len(bad))


def _is_response_list(v) -> bool:
    """``a_1`` holding M responses (strings, id lists or message lists) rather than one response."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and not isinstance(v[0], (dict, int, np.integer))


def _n_extra(name: str, cols: dict[str, list]) -> int:
    """M of the extra-pair columns (equal on every row and across a_1, a_2, g_aux)."""
    M = None
    for col, values in cols.items():
        for i, v in enumerate(values):
            if isinstance(v, (list, tuple)) and len(v) == 0:
                _fail(name, col, i, "empty list")
            m = len(v) if _is_response_list(v) or (col == "g_aux" and isinstance(v, (list, tuple))) else 1
            if M is None:
                M, first = m, (col, i)
            elif m != M:
                _fail(name, col, i, f"{m} extra pairs, but {first[0]!r} row {first[1]} has {M}")
    return M


def _as_list(v) -> list:
    """One response or M responses -> a list of M responses."""
    return list(v) if _is_response_list(v) else [v]


def _as_probs(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _resolve_aliases(ds: Dataset, name: str) -> Dataset:
    """Map the reference code's ``chosen_preference``/``a_1_preference`` columns onto ``g``/``g_aux``."""
    for alias, (target, partner) in ALIASES.items():
        if alias not in ds.column_names:
            continue
        if target in ds.column_names:
            raise ValueError(f"{name} dataset has both {target!r} and its alias {alias!r}: keep one")
        p = ds[alias][:]
        _probabilities(name, alias, p)
        if partner in ds.column_names:
            q = ds[partner][:]
            _probabilities(name, partner, q)
            bad = [i for i, (a, b) in enumerate(zip(p, q))
                   if np.max(np.abs(np.asarray(a, float) + np.asarray(b, float) - 1)) > ALIAS_ATOL]
            if bad:
                _fail(name, partner, bad[0], f"{alias} + {partner} = {np.add(p[bad[0]], q[bad[0]])}, not 1; "
                      f"only complementary pairs map cleanly onto {target!r} (give {target!r} directly)", len(bad))
            ds = ds.remove_columns(partner)
        ds = ds.rename_column(alias, target)
    return ds


def _fingerprint(ds: Dataset, columns: list[str]) -> str:
    """Content hash of the prepared columns (token ids and probabilities), independent of chunking."""
    import pyarrow as pa
    import pyarrow.compute as pc

    h = hashlib.sha256()

    def walk(arr):
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            h.update(np.asarray(pc.list_value_length(arr).fill_null(-1)).tobytes())
            walk(pc.list_flatten(arr))
        else:
            h.update(np.asarray(arr.cast(pa.float64()) if pa.types.is_floating(arr.type) else arr).tobytes())

    for col in columns:
        if col in ds.column_names:
            h.update(col.encode())
            walk(ds.data.table.column(col).combine_chunks())
    return h.hexdigest()[:20]


class _AtParams:
    """``module`` evaluated at other values of some parameters (``torch.func.functional_call``)."""

    def __init__(self, module, params: dict):
        self.module, self.params = module, params
        self.forward = module.forward  # for the cache-argument lookup

    def __call__(self, **kwargs):
        return torch.func.functional_call(self.module, self.params, (), kwargs, strict=False)


# ---------------------------------------------------------------------------------------- the trainer
class VRPOTrainer(DPOTrainer):
    """VRPO (``lam > 0``) or DPO (``lam = 0``) on TRL. Arguments as ``trl.DPOTrainer``, plus
    ``g_model``: a callable ``g_model(prompts, responses_a, responses_b) -> P(a > b)`` for
    ``g_source="model"``. ``train_dataset`` may also be a ``dict`` of columns or a pandas
    ``DataFrame``. Without ``ref_model`` (and without PEFT or precomputed reference
    log-probs) the reference is a frozen copy of ``model`` as passed, i.e. ``pi_ref``.
    """

    _tag_names = ["trl", "dpo", "vrpo"]
    _name = "VRPO"

    def __init__(self, model, ref_model=None, args: VRPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None,
                 g_model: Callable | None = None):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = VRPOConfig(f"{str(name).split('/')[-1]}-VRPO")
        if not isinstance(args, VRPOConfig):
            raise TypeError(f"args must be a VRPOConfig, got {type(args).__name__}")
        if (args.g_source == "model") != (g_model is not None):
            raise ValueError("g_source='model' needs g_model= (a callable), and g_model needs g_source='model'")
        self._g_model, self._n_extra_pairs = g_model, None
        self._uses_extra = args.lam != 0
        train_dataset, eval_dataset = self._to_dataset(train_dataset), self._to_dataset(eval_dataset)
        if ref_model is None and not isinstance(model, str) and peft_config is None and not is_peft_model(model) \
                and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model)  # pi_ref = the model as passed (TRL would reload it from its hub id)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self._is_vlm or self.aux_loss_enabled:
            raise NotImplementedError("VRPOTrainer supports text-only causal LMs without a MoE router loss")
        if data_collator is None:
            self.data_collator = self._collator()
        self._q = soft_label(args.loss_type[0], args.label_smoothing)
        self._power = PowerTuning(args.lam_auto_decay) if args.lam == "auto" else None
        self._lam = 0.0 if args.lam == "auto" else float(args.lam)
        self._pending = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
        self._frozen, self._frozen_step = None, -1
        if self._uses_extra and args.g_source == "self":  # trainable parameters only: the others never change
            self._frozen = {k: p.detach().clone() for k, p in self.model.named_parameters() if p.requires_grad}
        self._vr_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._n_params = sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------------------------ data
    @staticmethod
    def _to_dataset(ds):
        if ds is None or isinstance(ds, (Dataset, IterableDataset)) or isinstance(ds, dict) and ds and \
                all(isinstance(v, (Dataset, IterableDataset)) for v in ds.values()):
            return ds
        if isinstance(ds, dict):
            return Dataset.from_dict(ds)
        if type(ds).__name__ == "DataFrame":
            return Dataset.from_pandas(ds, preserve_index=False)
        return ds  # TRL raises its TypeError

    @property
    def _K(self) -> int:
        return 2 + 2 * (self._n_extra_pairs or 0)

    def _collator(self) -> DataCollatorForVRPO:
        return DataCollatorForVRPO(pad_token_id=self._tokenizer.pad_token_id, shared_prompt=self.args.shared_prompt,
                                   n_extra=self._n_extra_pairs or 0, max_length=self.args.max_length)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Validate, resolve ``g``, tokenise (TRL's own code, also for the extra pairs), truncate, filter."""
        if isinstance(dataset, IterableDataset):
            raise TypeError(f"{dataset_name} dataset: VRPOTrainer needs a map-style datasets.Dataset "
                            "(every row is validated before training)")
        ds = _resolve_aliases(dataset, dataset_name)
        tokenized = all(c in ds.column_names for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
        sfx = "_ids" if tokenized else ""
        need = [c + sfx for c in ("prompt", "chosen", "rejected") if c != "prompt" or tokenized or self._uses_extra]
        need += ["a_1" + sfx, "a_2" + sfx] if self._uses_extra else []
        if self._uses_extra and args.g_source == "columns":
            need += ["g", "g_aux"]
        missing = [c for c in need if c not in ds.column_names]
        if missing:
            why = f" (lam = {args.lam}, g_source = {args.g_source!r})" if self._uses_extra else ""
            raise ValueError(f"{dataset_name} dataset lacks column(s) {missing}{why}; it has {ds.column_names}")
        for col in ("g", "g_aux"):
            if col in ds.column_names:
                _probabilities(dataset_name, col, ds[col][:])
        M = 0
        if self._uses_extra:
            extra = {c: ds[c][:] for c in ("a_1" + sfx, "a_2" + sfx)}
            if args.g_source == "columns":
                extra["g_aux"] = ds["g_aux"][:]
            M = _n_extra(dataset_name, extra)
            if args.g_source == "model":
                ds = self._g_from_model(ds, M, dataset_name)
            elif args.g_source == "columns":
                ds = ds.remove_columns("g_aux").add_column("g_aux", [_as_probs(v) for v in extra["g_aux"]])
            if self._n_extra_pairs not in (None, M):
                raise ValueError(f"{dataset_name} dataset has {M} extra pairs per example, the training data "
                                 f"{self._n_extra_pairs}")
        self._n_extra_pairs = M
        no_filter = copy.copy(args)
        no_filter.max_length = None  # filtered below, after our truncation
        if not tokenized:
            base = ds.remove_columns([c for c in ("a_1", "a_2") if c in ds.column_names])
            ds = DPOTrainer._prepare_dataset(self, base, processing_class, no_filter, dataset_name)
            if M:
                ds = self._tokenize_extra(ds, extra["a_1"], extra["a_2"], M, processing_class, no_filter,
                                          dataset_name)
        elif M:
            ds = ds.map(lambda ex: {c: _as_list(ex[c]) for c in ("a_1_ids", "a_2_ids")})
        ds = self._truncate_and_check(ds, args, dataset_name, M)
        keep = ["prompt_ids", "chosen_ids", "rejected_ids"] + (["a_1_ids", "a_2_ids"] if M else []) \
            + [c for c in ("g", "g_aux", "ref_logps") if c in ds.column_names and (M or c == "ref_logps")]
        return ds.select_columns(keep)

    def _g_from_model(self, ds: Dataset, M: int, name: str) -> Dataset:
        prompts = ds["prompt"][:]
        a_1, a_2 = [_as_list(v) for v in ds["a_1"][:]], [_as_list(v) for v in ds["a_2"][:]]
        g = np.asarray(self._g_model(prompts, ds["chosen"][:], ds["rejected"][:]), float).reshape(-1)
        g_aux = np.stack([np.asarray(self._g_model(prompts, [a[m] for a in a_1], [a[m] for a in a_2]), float)
                          .reshape(-1) for m in range(M)], axis=1)  # (n, M)
        if g.shape != (len(ds),) or g_aux.shape != (len(ds), M):
            raise ValueError(f"g_model must return one probability per pair; got {g.shape} for {len(ds)} pairs")
        _probabilities(f"{name} (g_model output)", "g", g.tolist())
        _probabilities(f"{name} (g_model output)", "g_aux", g_aux.tolist())
        return ds.remove_columns([c for c in ("g", "g_aux") if c in ds.column_names]) \
            .add_column("g", g.tolist()).add_column("g_aux", g_aux.tolist())

    def _tokenize_extra(self, ds, a_1, a_2, M, processing_class, args, name) -> Dataset:
        """Tokenise each extra pair exactly as TRL tokenises (chosen, rejected), then move the
        prompt/response boundary to the shortest tokenised prompt of the row, so that every
        response continues the same prompt ids (each full sequence is unchanged)."""
        a_1, a_2 = [_as_list(v) for v in a_1], [_as_list(v) for v in a_2]
        parts = []
        for m in range(M):
            dm = Dataset.from_dict({"prompt": ds["prompt"][:], "chosen": [a[m] for a in a_1],
                                    "rejected": [a[m] for a in a_2]})
            dm = DPOTrainer._prepare_dataset(self, dm, processing_class, args, f"{name} extra pair {m}")
            parts.append((dm["prompt_ids"][:], dm["chosen_ids"][:], dm["rejected_ids"][:]))
        P = ds["prompt_ids"][:]
        L = [min([len(p)] + [len(part[0][i]) for part in parts]) for i, p in enumerate(P)]
        n = range(len(P))
        cols = {"prompt_ids": [P[i][: L[i]] for i in n],
                "chosen_ids": [P[i][L[i] :] + c for i, c in zip(n, ds["chosen_ids"][:])],
                "rejected_ids": [P[i][L[i] :] + r for i, r in zip(n, ds["rejected_ids"][:])],
                "a_1_ids": [[pp[0][i][L[i] :] + pp[1][i] for pp in parts] for i in n],
                "a_2_ids": [[pp[0][i][L[i] :] + pp[2][i] for pp in parts] for i in n]}
        ds = ds.remove_columns([c for c in cols if c in ds.column_names])
        for c, v in cols.items():
            ds = ds.add_column(c, v)
        return ds

    def _truncate_and_check(self, ds: Dataset, args, name: str, M: int) -> Dataset:
        cols = ["chosen_ids", "rejected_ids"] + (["a_1_ids", "a_2_ids"] if M else [])
        if args.max_prompt_length or args.max_completion_length:
            P, R = args.max_prompt_length, args.max_completion_length

            def cut(ex):
                out = {"prompt_ids": ex["prompt_ids"][-P:] if P else ex["prompt_ids"]}
                for c in cols:
                    out[c] = [r[:R] for r in ex[c]] if c.startswith("a_") else ex[c][:R]
                return out

            ds = ds.map(cut, desc=f"Truncating {name} dataset")
        for c in ["prompt_ids"] + cols:
            for i, v in enumerate(ds[c][:]):
                if not v or (c.startswith("a_") and any(len(r) == 0 for r in v)):
                    _fail(name, c, i, "empty token list (a causal LM needs >= 1 prompt and >= 1 response token)")
        if args.max_length is not None:
            n = len(ds)
            ds = ds.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
            if len(ds) < n:  # TRL drops them too (no completion token would be left)
                logger.warning(f"{name} dataset: dropped {n - len(ds)} of {n} rows whose prompt alone fills "
                               f"max_length={args.max_length}")
            if len(ds) == 0:
                raise ValueError(f"{name} dataset: every prompt fills max_length={args.max_length}")
        return ds

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "a_1_ids", "a_2_ids", "g", "g_aux",
                                       "ref_logps"]

    # ------------------------------------------------------------------------------------ reference log-probs
    @torch.no_grad()
    def _reference_logps(self, batch: dict) -> torch.Tensor:
        """(B, K) log-probs under pi_ref: the reference model, or the policy with its adapter disabled."""
        if self.ref_model is not None:
            return sequence_logps(self.ref_model, batch, self._K).float()
        if is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return sequence_logps(self.model, batch, self._K).float()
        return sequence_logps(self.model, batch, self._K).float()  # precompute before training: model = pi_ref

    @torch.no_grad()
    def dataset_logps(self, dataset: Dataset, model=None, batch_size: int | None = None) -> torch.Tensor:
        """(n, K) summed response log-probs of a prepared dataset under ``model`` (default pi_ref).

        Rows are split across processes and gathered, so every process returns the whole table."""
        batch_size = batch_size or self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        collate, dev = self._collator(), self.accelerator.device
        rank, world, n = self.accelerator.process_index, self.accelerator.num_processes, len(dataset)
        lo, hi = rank * n // world, (rank + 1) * n // world
        module = model or self.model
        was_training = module.training
        module.eval()
        out = []
        for s in range(lo, hi, batch_size):
            rows = dataset[s : min(s + batch_size, hi)]
            rows = [dict(zip(rows, vals)) for vals in zip(*rows.values())]
            batch = {k: v.to(dev) for k, v in collate(rows).items()}
            with self.accelerator.autocast():
                lp = self._reference_logps(batch) if model is None else sequence_logps(model, batch, self._K)
            out.extend(lp.float().cpu().tolist())
        module.train(was_training)
        rows = gather_object(out) if world > 1 else out
        return torch.tensor(rows, dtype=torch.float32).view(n, self._K)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        if "ref_logps" in dataset.column_names:  # given by the user (e.g. computed once for many runs)
            ref = dataset["ref_logps"][:]
            bad = [i for i, r in enumerate(ref) if len(r) < self._K or not np.all(np.isfinite(r[: self._K]))]
            if bad:
                _fail(name, "ref_logps", bad[0], f"needs {self._K} finite log-probs, got {ref[bad[0]]}", len(bad))
            return dataset
        return dataset.add_column("ref_logps", self.dataset_logps(dataset, batch_size=batch_size).tolist())

    # ------------------------------------------------------------------------------------ the loss
    def _g(self, inputs: dict, ref: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        src = self.args.g_source
        if not self._uses_extra:
            return None, None
        if src == "constant":
            B = ref.shape[0]
            return ref.new_full((B,), 0.5), ref.new_full((B, self._n_extra_pairs), 0.5)
        if src == "self":
            step = self.state.global_step
            live = dict(self.model.named_parameters())
            if self.model.training and step % self.args.self_g_refresh == 0 and self._frozen_step != step:
                with torch.no_grad():
                    for k, v in self._frozen.items():
                        v.copy_(live[k])
                self._frozen_step = step
            with torch.no_grad():
                frozen = _AtParams(self.model, self._frozen)  # the policy's forward at the frozen parameters
                g_all = self_g(sequence_logps(frozen, inputs, self._K).float(), ref, self.beta)  # (B, 1 + M)
            return g_all[:, 0], g_all[:, 1:]
        return inputs["g"], inputs["g_aux"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps = sequence_logps(model, inputs, self._K).float()  # (B, K)
        ref = inputs["ref_logps"] if "ref_logps" in inputs else self._reference_logps(inputs)  # (B, K)
        margins = pair_margins(logps, ref, self.beta)  # (B, 1 + M)
        g, g_aux = self._g(inputs, ref)
        loss = vrpo_loss(margins, self._q, self._lam, g, g_aux)
        if not bool(torch.isfinite(loss)):
            m = margins[:, 0].detach()
            raise NonFiniteError(f"VRPO step {self.state.global_step}: loss {loss.item()} (labelled margins "
                                 f"{m.min().item():.3g} .. {m.max().item():.3g}); stopped before the optimizer step: "
                                 "lower the learning rate or beta, or check the data and reference log-probs")
        if mode == "train" and self._power is not None:
            self._pending += PowerTuning.batch_sums(margins, self._q, g, g_aux).to(self._pending.device)
        d = margins[:, 0].detach()
        rec = self._vr_metrics[mode]
        rec["rewards/margins"].append(d.mean())
        rec["rewards/accuracies"].append((d > 0).float().mean())
        if self._uses_extra:
            rec["rewards/extra_margins"].append(margins[:, 1:].detach().mean())
        if self.args.lam == "auto":
            rec["lam"].append(torch.tensor(self._lam))
        return (loss, None) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self._power is not None and self.accelerator.sync_gradients:  # end of an optimisation step
            sums = self.accelerator.reduce(self._pending, reduction="sum") if self.accelerator.num_processes > 1 \
                else self._pending
            self._lam = self._power.update(sums.tolist())
            self._pending.zero_()
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def floating_point_ops(self, inputs) -> int:
        """6 x parameters x tokens (padding included), without a host sync."""
        tokens = sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids"))
        return 6 * self._n_params * tokens

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for key, vals in self._vr_metrics[mode].items():
            v = torch.stack(vals).float().mean().to(self.accelerator.device)
            self._metrics[mode][key] = [self.accelerator.gather(v[None]).mean().item()]
        self._vr_metrics[mode].clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------ checkpoints
    def _vrpo_state(self) -> dict:
        cols = ["prompt_ids", "chosen_ids", "rejected_ids", "a_1_ids", "a_2_ids", "g", "g_aux"]
        if getattr(self, "_data_fp", None) is None:
            self._data_fp = _fingerprint(self.train_dataset, cols)
        return {"format": 1, "settings": self.args.vrpo_settings(), "data_fingerprint": self._data_fp,
                "n_rows": len(self.train_dataset), "n_extra_pairs": self._n_extra_pairs,
                "lam": self._lam, "lam_auto_sums": self._power.sums if self._power else None,
                "lam_auto_raw": self._power.lam_raw if self._power else None, "self_g_step": self._frozen_step}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        out = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if "ref_logps" in self.train_dataset.column_names:
            save_file({"ref_logps": torch.tensor(self.train_dataset["ref_logps"][:], dtype=torch.float32)},
                      os.path.join(out, REF_FILE))
        if self._frozen is not None:
            save_file({k: v.contiguous() for k, v in self._frozen.items()}, os.path.join(out, SELF_G_FILE))
        write_json(os.path.join(out, STATE_FILE), self._vrpo_state(), indent=1)

    def _restore_vrpo_state(self, ckpt: str) -> None:
        """Refuse a checkpoint of other settings, data or pi_ref; restore lam moments and the frozen g model."""
        path = os.path.join(ckpt, STATE_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{ckpt} has no {STATE_FILE}: not a VRPOTrainer checkpoint")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        now = json.loads(json.dumps(self._vrpo_state()))
        diff = {k: (saved["settings"].get(k), v) for k, v in now["settings"].items() if saved["settings"].get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {ckpt} was written with other VRPO settings (saved, now): {diff}")
        if (saved["data_fingerprint"], saved["n_rows"]) != (now["data_fingerprint"], now["n_rows"]):
            raise ValueError(f"checkpoint {ckpt} was written for other training data ({saved['n_rows']} rows, "
                             f"fingerprint {saved['data_fingerprint']}; now {now['n_rows']} rows, "
                             f"{now['data_fingerprint']}): resuming would mix two data sets")
        ref_path = os.path.join(ckpt, REF_FILE)
        if os.path.isfile(ref_path) and "ref_logps" in self.train_dataset.column_names:
            from safetensors.torch import load_file

            old = load_file(ref_path)["ref_logps"]
            new = torch.tensor(self.train_dataset["ref_logps"][:], dtype=torch.float32)
            worst = (old - new).abs().max().item() if old.shape == new.shape else float("inf")
            if not worst <= 1e-3:  # float noise of a recomputation is ~1e-5
                raise ValueError(f"checkpoint {ckpt}: the reference log-probs differ from this trainer's (max |diff| "
                                 f"{worst:.3g}); construct the trainer from the same pi_ref")
        self._lam = saved["lam"]
        if self._power is not None:
            self._power.sums, self._power.lam_raw = saved["lam_auto_sums"], saved["lam_auto_raw"]
        if self._frozen is not None:
            from safetensors.torch import load_file

            with torch.no_grad():
                for k, v in load_file(os.path.join(ckpt, SELF_G_FILE)).items():
                    self._frozen[k].copy_(v)
            self._frozen_step = saved["self_g_step"]

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self._restore_vrpo_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
