"""VRPO as a TRL trainer: ``VRPOConfig(trl.DPOConfig)``, ``VRPOTrainer(trl.DPOTrainer)`` (guide: docs/vrpo_trainer.md).

Added to TRL: the columns ``a_1, a_2`` (M extra responses from ``pi_ref``) and ``g, g_aux``,
checked before training (one error naming column and row, nothing repaired); the loss
:func:`llm.vrpo_loss.vrpo_loss` (:func:`vrpo.loss.vr_objective` on the DPO margins) with ``lam``
fixed or power-tuned online; ``g`` sources; the shared-prompt forward; a step without TRL's
fused-head side outputs and per-step host syncs; checkpoints refusing other data, settings or pi_ref.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset, IterableDataset
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from vrpo_common.fileio import write_json

from .vrpo_loss import PowerTuning, pad_batch, pair_margins, sequence_logps, soft_label, vrpo_loss

__all__ = ["VRPOConfig", "VRPOTrainer", "collate_vrpo", "NonFiniteError", "G_SOURCES", "LOSS_TYPES"]

G_SOURCES = ("columns", "model", "self", "constant")
LOSS_TYPES = ("sigmoid", "robust")
PREPARED = ["prompt_ids", "chosen_ids", "rejected_ids", "a_1_ids", "a_2_ids", "g", "g_aux"]  # after preparation
STATE_FILE, TENSOR_FILE = "vrpo_state.json", "vrpo_state.safetensors"  # in every checkpoint folder
# the paper's reference code: per-response probabilities of the two members of a pair
ALIASES = {"chosen_preference": ("g", "rejected_preference"), "a_1_preference": ("g_aux", "a_2_preference")}
ALIAS_ATOL = 1e-6  # float32 storage of p and 1 - p
logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss (stopped before the optimizer step)."""


@dataclass
class VRPOConfig(DPOConfig):
    """Every ``trl.DPOConfig`` field plus the VRPO ones (help strings; guide: docs/vrpo_trainer.md).

    Differs from DPOConfig in: ``loss_type`` is ``"sigmoid"`` or ``"robust"`` (losses linear in the
    label, so the VR correction keeps its target); ``label_smoothing`` ``eps`` in [0, 0.5) is the
    soft label ``1 - eps`` of the labelled pair with ``"sigmoid"`` (conservative DPO; TRL 1.16's
    sigmoid ignores it) and robust DPO's ``(1 - eps) / (1 - 2 eps)`` with ``"robust"`` (TRL's loss);
    gradient checkpointing is off by default (the shared-prompt forward needs the KV cache).
    """

    # "| None" makes HfArgumentParser pass command-line values as strings ("auto", "0.5"); None is rejected below
    lam: float | str | None = field(default=1.0, metadata={"help": "0 = DPO, 1 = the paper's VRPO, float >= 0, or "
                             "'auto' (power-tuned online, clipped to [0, 1], logged)"})
    lam_auto_decay: float = field(default=0.99, metadata={"help": "per-step decay of the 'auto' moments (1: sums)"})
    g_source: Literal["columns", "model", "self", "constant"] = field(default="columns", metadata={"help": "columns (g, g_aux) | model (the trainer's g_model("
                          "prompts, a, b) -> P(a > b)) | self (frozen policy, g = sigma(margin)) | constant (1/2)"})
    self_g_refresh: int = field(default=20, metadata={"help": "steps between refreshes of the frozen g model"})
    shared_prompt: bool = field(default=True, metadata={"help": "encode each prompt once for all its responses"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "keep the last prompt tokens"})
    max_completion_length: int | None = field(default=None, metadata={"help": "keep the first response tokens"})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "off by default here"})

    def __post_init__(self):
        if isinstance(self.lam, str) and self.lam != "auto":
            try:  # a number from a command line
                self.lam = float(self.lam)
            except ValueError:
                raise ValueError(f"lam must be a number >= 0 or 'auto', got {self.lam!r}") from None
        losses = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        lam_ok = self.lam == "auto" or (isinstance(self.lam, (int, float)) and not isinstance(self.lam, bool)
                                        and math.isfinite(self.lam) and self.lam >= 0)
        checks = {f"lam must be a finite number >= 0 or 'auto', got {self.lam!r}": lam_ok,
                  "lam_auto_decay must be in (0, 1]": 0 < self.lam_auto_decay <= 1,
                  f"g_source must be one of {G_SOURCES}": self.g_source in G_SOURCES,
                  "self_g_refresh must be >= 1": int(self.self_g_refresh) >= 1,
                  f"VRPOTrainer supports one loss_type from {LOSS_TYPES} (the VR correction needs a loss linear in "
                  f"the label), got {losses}": len(losses) == 1 and losses[0] in LOSS_TYPES,
                  "label_smoothing must be in [0, 0.5)": 0 <= self.label_smoothing < 0.5,
                  "beta must be > 0": self.beta > 0,
                  "max_prompt_length and max_completion_length must be >= 1 or None":
                      all(v is None or int(v) >= 1 for v in (self.max_prompt_length, self.max_completion_length))}
        unsupported = {"ld_alpha": self.ld_alpha is not None, "use_weighting": self.use_weighting,
                       "f_divergence_type": self.f_divergence_type != "reverse_kl",
                       "loss_weights": self.loss_weights not in (None, [1.0]),
                       "truncation_mode": self.truncation_mode != "keep_start"}
        checks[f"VRPOTrainer does not support these DPOConfig settings: {[k for k, v in unsupported.items() if v]} "
               "(keep their defaults)"] = not any(unsupported.values())
        for msg, ok in checks.items():
            if not ok:
                raise ValueError(msg)
        super().__post_init__()
        if self.shared_prompt and self.activation_checkpointing:
            raise ValueError("shared_prompt=True needs the KV cache, which gradient checkpointing disables: "
                             "set gradient_checkpointing=False or shared_prompt=False")

    def vrpo_settings(self) -> dict:
        """The settings that define the objective (stored in, and checked against, checkpoints)."""
        return {k: getattr(self, k) for k in ("lam", "lam_auto_decay", "g_source", "self_g_refresh", "shared_prompt",
                "max_prompt_length", "max_completion_length", "max_length", "beta", "loss_type", "label_smoothing")}


def collate_vrpo(examples: list[dict[str, Any]], pad_token_id: int, shared_prompt: bool = True, n_extra: int = 0,
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Prepared rows -> :func:`llm.vrpo_loss.pad_batch` tensors plus ``ref_logps`` (B, K), ``g`` (B,),
    ``g_aux`` (B, M); ``n_extra = 0`` is DPO (K = 2). Responses are cut to ``max_length - len(prompt)``
    tokens (TRL's ``keep_start``). The trainer's ``data_collator`` is this function, bound."""
    responses = []
    for ex in examples:
        rs = [ex["chosen_ids"], ex["rejected_ids"]] + [r for m in range(n_extra) for r in (ex["a_1_ids"][m],
                                                                                          ex["a_2_ids"][m])]
        lim = None if max_length is None else max_length - len(ex["prompt_ids"])
        responses.append([r[:lim] for r in rs])
    out = pad_batch([ex["prompt_ids"] for ex in examples], responses, pad_token_id, shared_prompt)
    f32 = lambda key, n=None: torch.tensor([ex[key][:n] if n else ex[key] for ex in examples], dtype=torch.float32)  # noqa: E731
    if "ref_logps" in examples[0]:
        out["ref_logps"] = f32("ref_logps", 2 + 2 * n_extra)  # (B, K)
    if n_extra and "g" in examples[0]:
        out["g"], out["g_aux"] = f32("g"), f32("g_aux", n_extra)  # (B,), (B, M)
    return out


# ---------------------------------------------------------------------------------------- data checks
def _fail(name: str, col: str, row: int, msg: str, n_bad: int = 1):
    more = f" ({n_bad} rows in all)" if n_bad > 1 else ""
    raise ValueError(f"{name} dataset, column {col!r}, row {row}: {msg}{more}. Nothing was repaired: fix the data.")


def _probabilities(name: str, col: str, values: list) -> None:
    """Every value a real number in [0, 1] (lists allowed: one per extra pair); NaN, bool, str fail."""
    ok = lambda x: isinstance(x, (int, float, np.number)) and not isinstance(x, (bool, np.bool_)) and 0 <= x <= 1  # noqa: E731
    bad = [(i, next(x for x in v if not ok(x)) if isinstance(v, (list, tuple)) else v) for i, v in enumerate(values)
           if not (all(map(ok, v)) if isinstance(v, (list, tuple)) else ok(v))]
    if bad:
        _fail(name, col, bad[0][0], f"{bad[0][1]!r} is not a probability in [0, 1]", len(bad))


def _is_response_list(v) -> bool:
    """``a_1`` holding M responses (strings, id lists or message lists) rather than one response."""
    return isinstance(v, (list, tuple)) and len(v) > 0 and not isinstance(v[0], (dict, int, np.integer))


def _as_list(v) -> list:
    """One response or M responses -> a list of M responses."""
    return list(v) if _is_response_list(v) else [v]


def _n_extra(name: str, cols: dict[str, list]) -> int:
    """M of the extra-pair columns (equal on every row and across a_1, a_2, g_aux)."""
    M = first = None
    for col, values in cols.items():
        for i, v in enumerate(values):
            if isinstance(v, (list, tuple)) and len(v) == 0:
                _fail(name, col, i, "empty list")
            m = len(v) if _is_response_list(v) or (col == "g_aux" and isinstance(v, (list, tuple))) else 1
            M, first = (m, (col, i)) if M is None else (M, first)
            if m != M:
                _fail(name, col, i, f"{m} extra pairs, but {first[0]!r} row {first[1]} has {M}")
    return M


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
            bad = [i for i, (a, b) in enumerate(zip(p, q)) if np.max(np.abs(np.add(a, b) - 1.0)) > ALIAS_ATOL]
            if bad:
                _fail(name, partner, bad[0], f"{alias} + {partner} = {np.add(p[bad[0]], q[bad[0]])}, not 1; "
                      f"only complementary pairs map cleanly onto {target!r} (give {target!r} directly)", len(bad))
            ds = ds.remove_columns(partner)
        ds = ds.rename_column(alias, target)
    return ds


def _fingerprint(ds: Dataset) -> str:
    """Content hash of the prepared columns (token ids and probabilities; JSON floats are exact)."""
    blob = json.dumps(ds.select_columns([c for c in PREPARED if c in ds.column_names])[:], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class _AtParams:
    """``module`` evaluated at other values of some parameters (``torch.func.functional_call``)."""

    def __init__(self, module, params: dict):
        self.module, self.params, self.forward = module, params, module.forward  # forward: for the cache-arg lookup

    def __call__(self, **kwargs):
        return torch.func.functional_call(self.module, self.params, (), kwargs, strict=False)


# ---------------------------------------------------------------------------------------- the trainer
class VRPOTrainer(DPOTrainer):
    """VRPO (``lam > 0``) or DPO (``lam = 0``) on TRL. Arguments as ``trl.DPOTrainer``, plus
    ``g_model(prompts, responses_a, responses_b) -> P(a > b)`` for ``g_source="model"``;
    ``train_dataset`` may also be a dict of columns or a pandas DataFrame. Without ``ref_model``
    (and without PEFT or precomputed reference log-probs) the reference is a copy of ``model``
    as passed, i.e. ``pi_ref``.
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
        self._g_model, self._n_extra_pairs, self._uses_extra = g_model, None, args.lam != 0
        if ref_model is None and not isinstance(model, str) and peft_config is None and not is_peft_model(model) \
                and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(model)  # pi_ref = the model as passed (TRL would reload it from its hub id)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=self._to_dataset(train_dataset), eval_dataset=self._to_dataset(eval_dataset),
                         processing_class=processing_class, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)
        if self._is_vlm or self.aux_loss_enabled:
            raise NotImplementedError("VRPOTrainer supports text-only causal LMs without a MoE router loss")
        self.data_collator = data_collator or self._collator()
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
        """A dict of columns or a pandas DataFrame becomes a ``datasets.Dataset`` (TRL rejects other types)."""
        if isinstance(ds, dict) and not all(isinstance(v, (Dataset, IterableDataset)) for v in ds.values()):
            return Dataset.from_dict(ds)
        return Dataset.from_pandas(ds, preserve_index=False) if type(ds).__name__ == "DataFrame" else ds

    def _collator(self):
        return functools.partial(collate_vrpo, pad_token_id=self._tokenizer.pad_token_id,
                                 shared_prompt=self.args.shared_prompt, n_extra=self._n_extra_pairs or 0,
                                 max_length=self.args.max_length)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Validate, resolve ``g``, tokenise (TRL's own code, also for the extra pairs), truncate, filter."""
        name = dataset_name
        if isinstance(dataset, IterableDataset):
            raise TypeError(f"{name} dataset: VRPOTrainer needs a map-style datasets.Dataset (rows are validated)")
        ds = _resolve_aliases(dataset, name)
        tokenized = all(c in ds.column_names for c in PREPARED[:3])
        sfx = "_ids" if tokenized else ""
        need = [c + sfx for c in ("prompt", "chosen", "rejected") if c != "prompt" or tokenized or self._uses_extra]
        need += (["a_1" + sfx, "a_2" + sfx] if self._uses_extra else []) + \
            (["g", "g_aux"] if self._uses_extra and args.g_source == "columns" else [])
        if missing := [c for c in need if c not in ds.column_names]:
            why = f" (lam = {args.lam}, g_source = {args.g_source!r})" if self._uses_extra else ""
            raise ValueError(f"{name} dataset lacks column(s) {missing}{why}; it has {ds.column_names}")
        for col in ("g", "g_aux"):
            if col in ds.column_names:
                _probabilities(name, col, ds[col][:])
        M, extra = 0, {}
        if self._uses_extra:
            extra = {c: ds[c][:] for c in ["a_1" + sfx, "a_2" + sfx] + (["g_aux"] if args.g_source == "columns" else [])}
            M = _n_extra(name, extra)
            if args.g_source == "model":
                ds = self._g_from_model(ds, M, name)
            elif args.g_source == "columns":
                ds = ds.remove_columns("g_aux").add_column("g_aux", [list(v) if isinstance(v, (list, tuple)) else [v]
                                                                     for v in extra["g_aux"]])
            if self._n_extra_pairs not in (None, M):
                raise ValueError(f"{name} dataset has {M} extra pairs per example, the training data "
                                 f"{self._n_extra_pairs}")
        self._n_extra_pairs, self._K = M, 2 + 2 * M  # responses per example
        no_filter = copy.copy(args)
        no_filter.max_length = None  # filtered below, after our truncation
        if not tokenized:
            ds = DPOTrainer._prepare_dataset(self, ds.remove_columns([c for c in ("a_1", "a_2") if c in ds.column_names]),
                                             processing_class, no_filter, name)
            if M:
                ds = self._tokenize_extra(ds, extra["a_1"], extra["a_2"], M, processing_class, no_filter, name)
        elif M:
            ds = ds.map(lambda ex: {c: _as_list(ex[c]) for c in ("a_1_ids", "a_2_ids")})
        ds = self._truncate_and_check(ds, args, name, M)
        keep = PREPARED[: 5 if M else 3] + (["g", "g_aux"] if M else []) + ["ref_logps"]
        return ds.select_columns([c for c in keep if c in ds.column_names])

    def _g_from_model(self, ds: Dataset, M: int, name: str) -> Dataset:
        prompts, pair = ds["prompt"][:], lambda col, m: [_as_list(v)[m] for v in ds[col][:]]  # noqa: E731
        g = np.asarray(self._g_model(prompts, ds["chosen"][:], ds["rejected"][:]), float).reshape(-1)
        g_aux = np.stack([np.asarray(self._g_model(prompts, pair("a_1", m), pair("a_2", m)), float).reshape(-1)
                          for m in range(M)], axis=1)  # (n, M)
        if g.shape != (len(ds),) or g_aux.shape != (len(ds), M):
            raise ValueError(f"g_model must return one probability per pair; got {g.shape} for {len(ds)} pairs")
        for col, v in (("g", g.tolist()), ("g_aux", g_aux.tolist())):
            _probabilities(f"{name} (g_model output)", col, v)
            ds = (ds.remove_columns(col) if col in ds.column_names else ds).add_column(col, v)
        return ds

    def _tokenize_extra(self, ds, a_1, a_2, M, processing_class, args, name) -> Dataset:
        """Tokenise each extra pair exactly as TRL tokenises (chosen, rejected), then move the
        prompt/response boundary to the shortest tokenised prompt of the row, so that every
        response continues the same prompt ids (each full sequence is unchanged)."""
        a_1, a_2 = [_as_list(v) for v in a_1], [_as_list(v) for v in a_2]
        groups = [(ds["prompt_ids"][:], ds["chosen_ids"][:], ds["rejected_ids"][:])]  # (prompt, first, second) ids
        for m in range(M):
            dm = Dataset.from_dict({"prompt": ds["prompt"][:], "chosen": [a[m] for a in a_1],
                                    "rejected": [a[m] for a in a_2]})
            dm = DPOTrainer._prepare_dataset(self, dm, processing_class, args, f"{name} extra pair {m}")
            groups.append((dm["prompt_ids"][:], dm["chosen_ids"][:], dm["rejected_ids"][:]))
        n = range(len(ds))
        L = [min(len(g[0][i]) for g in groups) for i in n]
        moved = lambda g, j: [g[0][i][L[i] :] + g[j][i] for i in n]  # noqa: E731  boundary moved to L
        cols = {"prompt_ids": [groups[0][0][i][: L[i]] for i in n], "chosen_ids": moved(groups[0], 1),
                "rejected_ids": moved(groups[0], 2),
                "a_1_ids": [list(x) for x in zip(*[moved(g, 1) for g in groups[1:]])],
                "a_2_ids": [list(x) for x in zip(*[moved(g, 2) for g in groups[1:]])]}
        ds = ds.remove_columns([c for c in cols if c in ds.column_names])
        for c, v in cols.items():
            ds = ds.add_column(c, v)
        return ds

    def _truncate_and_check(self, ds: Dataset, args, name: str, M: int) -> Dataset:
        cols = PREPARED[1:5 if M else 3]
        P, R = args.max_prompt_length, args.max_completion_length
        if P or R:
            ds = ds.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-P:] if P else ex["prompt_ids"],
                                    **{c: [r[:R] for r in ex[c]] if c.startswith("a_") else ex[c][:R] for c in cols}},
                        desc=f"Truncating {name} dataset")
        for c in PREPARED[:1] + cols:
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
        self._signature_columns = self._signature_columns or [*PREPARED, "ref_logps"]

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
        collate, dev, world, n = self._collator(), self.accelerator.device, self.accelerator.num_processes, len(dataset)
        lo, hi = self.accelerator.process_index * n // world, (self.accelerator.process_index + 1) * n // world
        module = model or self.model
        was_training, out = module.training, []
        module.eval()
        for s in range(lo, hi, batch_size):
            batch = {k: v.to(dev) for k, v in collate(dataset.select(range(s, min(s + batch_size, hi))).to_list()).items()}
            with self.accelerator.autocast():
                lp = self._reference_logps(batch) if model is None else sequence_logps(model, batch, self._K)
            out.extend(lp.float().cpu().tolist())
        module.train(was_training)
        return torch.tensor(gather_object(out) if world > 1 else out, dtype=torch.float32).view(n, self._K)

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
        """(B,) and (B, M) auxiliary probabilities of the labelled and the extra pairs."""
        if not self._uses_extra:
            return None, None
        if self.args.g_source == "constant":
            return ref.new_full((ref.shape[0],), 0.5), ref.new_full((ref.shape[0], self._n_extra_pairs), 0.5)
        if self.args.g_source != "self":
            return inputs["g"], inputs["g_aux"]
        step = self.state.global_step
        with torch.no_grad():
            if self.model.training and step % self.args.self_g_refresh == 0 and self._frozen_step != step:
                live = dict(self.model.named_parameters())
                for k, v in self._frozen.items():
                    v.copy_(live[k])
                self._frozen_step = step
            frozen = _AtParams(self.model, self._frozen)  # the policy's forward at the frozen parameters
            g_all = pair_margins(sequence_logps(frozen, inputs, self._K).float(), ref, self.beta).sigmoid()  # (B, 1+M)
        return g_all[:, 0], g_all[:, 1:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        logps = sequence_logps(model, inputs, self._K).float()  # (B, K)
        ref = inputs["ref_logps"] if "ref_logps" in inputs else self._reference_logps(inputs)  # (B, K)
        margins = pair_margins(logps, ref, self.beta)  # (B, 1 + M)
        g, g_aux = self._g(inputs, ref)
        loss = vrpo_loss(margins, self._q, self._lam, g, g_aux)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"VRPO step {self.state.global_step}: loss {loss.item()} (labelled margins "
                                 f"{margins[:, 0].tolist()}); stopped before the optimizer step: lower the learning "
                                 "rate or beta, or check the data and reference log-probs")
        if mode == "train" and self._power is not None:
            self._pending += PowerTuning.batch_sums(margins, self._q, g, g_aux).to(self._pending.device)
        d, rec = margins.detach(), self._vr_metrics[mode]  # metrics stay on the device until logged
        rec["rewards/margins"].append(d[:, 0].mean())
        rec["rewards/accuracies"].append((d[:, 0] > 0).float().mean())
        if self._uses_extra:
            rec["rewards/extra_margins"].append(d[:, 1:].mean())
        if self.args.lam == "auto":
            rec["lam"].append(torch.tensor(self._lam))
        return (loss, None) if return_outputs else loss

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self._power is not None and self.accelerator.sync_gradients:  # end of an optimisation step
            world = self.accelerator.num_processes
            self._lam = self._power.update((self.accelerator.reduce(self._pending, "sum") if world > 1
                                            else self._pending).tolist())
            self._pending.zero_()
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad(), self.compute_loss_context_manager():
            return self.compute_loss(model, self._prepare_inputs(inputs)).detach(), None, None

    def floating_point_ops(self, inputs) -> int:
        """6 x parameters x tokens (padding included), without a host sync."""
        return 6 * self._n_params * sum(v.numel() for k, v in inputs.items() if k.endswith("input_ids"))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        for key, vals in self._vr_metrics[mode].items():
            v = torch.stack(vals).float().mean().to(self.accelerator.device)
            self._metrics[mode][key] = [self.accelerator.gather(v[None]).mean().item()]
        self._vr_metrics[mode].clear()
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------ checkpoints
    def _vrpo_state(self) -> dict:
        self._data_fp = getattr(self, "_data_fp", None) or _fingerprint(self.train_dataset)  # computed once
        return {"format": 1, "settings": self.args.vrpo_settings(), "data_fingerprint": self._data_fp,
                "n_rows": len(self.train_dataset), "n_extra_pairs": self._n_extra_pairs,
                "lam": self._lam, "lam_auto_sums": self._power.sums if self._power else None,
                "lam_auto_raw": self._power.lam_raw if self._power else None, "self_g_step": self._frozen_step}

    def _ref_table(self) -> dict[str, torch.Tensor]:
        ds = self.train_dataset
        return {"ref_logps": torch.tensor(ds["ref_logps"][:], dtype=torch.float32)} if "ref_logps" in ds.column_names \
            else {}

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        out = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        frozen = {f"self_g.{k}": v.contiguous() for k, v in (self._frozen or {}).items()}
        save_file({**frozen, **self._ref_table()}, os.path.join(out, TENSOR_FILE))
        write_json(os.path.join(out, STATE_FILE), self._vrpo_state(), indent=1)

    def _restore_vrpo_state(self, ckpt: str) -> None:
        """Refuse a checkpoint of other settings, data or pi_ref; restore lam moments and the frozen g model."""
        from safetensors.torch import load_file

        if not os.path.isfile(os.path.join(ckpt, STATE_FILE)):
            raise ValueError(f"{ckpt} has no {STATE_FILE}: not a VRPOTrainer checkpoint")
        with open(os.path.join(ckpt, STATE_FILE), encoding="utf-8") as f:
            saved = json.load(f)
        now = json.loads(json.dumps(self._vrpo_state()))
        diff = {k: (saved["settings"].get(k), v) for k, v in now["settings"].items() if saved["settings"].get(k) != v}
        if diff:
            raise ValueError(f"checkpoint {ckpt} was written with other VRPO settings (saved, now): {diff}")
        if (saved["data_fingerprint"], saved["n_rows"]) != (now["data_fingerprint"], now["n_rows"]):
            raise ValueError(f"checkpoint {ckpt} was written for other training data ({saved['n_rows']} rows, "
                             f"fingerprint {saved['data_fingerprint']}; now {now['n_rows']} rows, "
                             f"{now['data_fingerprint']}): resuming would mix two data sets")
        tensors = load_file(os.path.join(ckpt, TENSOR_FILE))
        old, new = tensors.get("ref_logps"), self._ref_table().get("ref_logps")
        if old is not None and new is not None:
            worst = (old - new).abs().max().item() if old.shape == new.shape else float("inf")
            if not worst <= 1e-3:  # float noise of a recomputation is ~1e-5
                raise ValueError(f"checkpoint {ckpt}: the reference log-probs differ from this trainer's (max |diff| "
                                 f"{worst:.3g}); construct the trainer from the same pi_ref")
        self._lam, self._frozen_step = saved["lam"], saved["self_g_step"]
        if self._power is not None:
            self._power.sums, self._power.lam_raw = saved["lam_auto_sums"], saved["lam_auto_raw"]
        with torch.no_grad():
            for k, v in (self._frozen or {}).items():
                v.copy_(tensors[f"self_g.{k}"])

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint:
            self._restore_vrpo_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)
