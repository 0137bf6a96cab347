"""DPO/VRPO on a causal LM: sequence log-probs, implicit-reward margins, and the
VR objective of :mod:`vrpo.loss` applied to them.

Nothing here re-derives the loss: :func:`vrpo_objective` builds the DPO margins
``delta = beta * (log pi/pi_ref (y1) - log pi/pi_ref (y2))`` and hands them to
:func:`vrpo.loss.vr_objective` (METHOD.md s2, "One-stage"):

    L = mean_i[ l(delta_i, Z_i) - lam l(delta_i, g_i) ] + lam mean_i l(delta_aux_i, g_aux_i)

with ``l`` the logistic loss, ``(y1, y2) = (chosen, rejected)`` so ``Z = 1``, and
``(a_1, a_2)`` the extra pair sampled from ``pi_ref``. ``lam = 0`` is DPO exactly
(TRL's ``loss_type="sigmoid"``, no label smoothing).

Two ways to get the four sequence log-probs of a batch, equal up to float error
(tested):

- :func:`sequence_logps_naive`: every ``prompt + response`` as its own row,
  ``K`` rows per example, one batched forward.
- :func:`sequence_logps_shared_prompt`: the prompt encoded once per example, its
  KV cache repeated ``K`` times and the responses continued from it; gradients
  flow through the prompt's keys and values. With prompts ~3x longer than
  responses this makes VRPO's four sequences cost about as much as DPO's two.

Column order of the ``(B, K)`` log-prob tensors: ``0 = chosen (y1)``,
``1 = rejected (y2)``, ``2 = a_1``, ``3 = a_2`` (``K = 2`` for DPO).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from vrpo.loss import sigmoid, vr_objective

__all__ = [
    "TokenizedBatch",
    "collate",
    "sequence_logps",
    "sequence_logps_naive",
    "sequence_logps_shared_prompt",
    "dpo_margins",
    "vrpo_objective",
    "self_g",
]


@dataclass
class TokenizedBatch:
    """``B`` examples, each one prompt and ``K`` responses, as lists of token ids."""

    prompts: list[list[int]]  # B lists
    responses: list[list[list[int]]]  # B lists of K lists

    @property
    def B(self) -> int:
        return len(self.prompts)

    @property
    def K(self) -> int:
        return len(self.responses[0])


def collate(prompts: list[list[int]], responses: list[list[list[int]]]) -> TokenizedBatch:
    """Check shapes and bundle token ids (every response non-empty, same ``K`` per example)."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need one response list per prompt; got {len(prompts)} prompts, {len(responses)} lists")
    K = len(responses[0])
    for i, (p, rs) in enumerate(zip(prompts, responses)):
        if len(rs) != K:
            raise ValueError(f"example {i} has {len(rs)} responses, expected {K}")
        if not p:
            raise ValueError(f"example {i} has an empty prompt (a causal LM needs >= 1 prompt token)")
        if any(len(r) == 0 for r in rs):
            raise ValueError(f"example {i} has an empty response")
    return TokenizedBatch(prompts, responses)


def _forward_kwargs(model) -> dict:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return {"cache_arg": "cache" if "cache" in params else "past_key_values"}


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` in float32. logits (N, T, V), targets (N, T) -> (N, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logps_naive(model, batch: TokenizedBatch, pad_id: int) -> torch.Tensor:
    """Sum of response-token log-probs, one row per ``prompt + response``; returns (B, K).

    Rows are left-padded so every response ends at the last position, and only
    the last ``max_response_len`` logits are materialised (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    B, K = batch.B, batch.K
    seqs = [p + r for p, rs in zip(batch.prompts, batch.responses) for r in rs]  # B*K
    rlens = torch.tensor([len(r) for rs in batch.responses for r in rs], device=device)  # (BK,)
    T = max(len(s) for s in seqs)
    Tr = int(rlens.max())
    ids = torch.full((B * K, T), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B * K, T), dtype=torch.long, device=device)
    for j, s in enumerate(seqs):
        ids[j, T - len(s) :] = torch.tensor(s, device=device)
        mask[j, T - len(s) :] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (BK, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=Tr + 1)
    logits = out.logits[:, :-1]  # (BK, Tr, V): position t predicts token t+1
    targets = ids[:, T - Tr :]  # (BK, Tr)
    rmask = torch.arange(Tr, device=device)[None, :] >= (Tr - rlens)[:, None]  # (BK, Tr) response tokens
    lp = _token_logps(logits, targets) * rmask
    return lp.sum(1).view(B, K)


def sequence_logps_shared_prompt(model, batch: TokenizedBatch, pad_id: int) -> torch.Tensor:
    """Same as :func:`sequence_logps_naive`, encoding each prompt once; returns (B, K).

    Prompts are left-padded (B, Tp); their KV cache is repeated to (B*K, Tp) and the
    right-padded responses (B*K, Tr) are run on top of it. The first response
    token is scored by the prompt's last logit. Gradients flow through the cache.
    """
    device = next(model.parameters()).device
    B, K = batch.B, batch.K
    cache_arg = _forward_kwargs(model)["cache_arg"]
    Tp = max(len(p) for p in batch.prompts)
    pids = torch.full((B, Tp), pad_id, dtype=torch.long, device=device)
    pmask = torch.zeros((B, Tp), dtype=torch.long, device=device)
    for i, p in enumerate(batch.prompts):
        pids[i, Tp - len(p) :] = torch.tensor(p, device=device)
        pmask[i, Tp - len(p) :] = 1
    ppos = (pmask.cumsum(1) - 1).clamp(min=0)  # (B, Tp)
    out_p = model(input_ids=pids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
    cache = out_p.cache if getattr(out_p, "cache", None) is not None else out_p.past_key_values
    if not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(model).__name__} returned a {type(cache).__name__} without batch_repeat_interleave; "
                        "use shared_prompt=False for this model")
    cache.batch_repeat_interleave(K)  # every layer's K/V: (B, H, Tp, hd) -> (B*K, H, Tp, hd)

    resp = [r for rs in batch.responses for r in rs]  # B*K
    Tr = max(len(r) for r in resp)
    rids = torch.full((B * K, Tr), pad_id, dtype=torch.long, device=device)
    rmask = torch.zeros((B * K, Tr), dtype=torch.long, device=device)
    for j, r in enumerate(resp):
        rids[j, : len(r)] = torch.tensor(r, device=device)
        rmask[j, : len(r)] = 1
    plen = pmask.sum(1).repeat_interleave(K)  # (BK,)
    rpos = plen[:, None] + torch.arange(Tr, device=device)[None, :]  # (BK, Tr)
    full_mask = torch.cat([pmask.repeat_interleave(K, dim=0), rmask], dim=1)  # (BK, Tp+Tr)
    out_r = model(input_ids=rids, attention_mask=full_mask, position_ids=rpos, use_cache=True, **{cache_arg: cache})
    logits = torch.cat([out_p.logits.repeat_interleave(K, dim=0), out_r.logits[:, :-1]], dim=1)  # (BK, Tr, V)
    lp = _token_logps(logits, rids) * rmask
    return lp.sum(1).view(B, K)


def sequence_logps(model, batch: TokenizedBatch, pad_id: int, shared_prompt: bool = True) -> torch.Tensor:
    """(B, K) summed response log-probs under ``model`` by the shared-prompt or the naive path."""
    fn = sequence_logps_shared_prompt if shared_prompt else sequence_logps_naive
    return fn(model, batch, pad_id)


def dpo_margins(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit-reward margins per pair: (B, 2P) log-probs -> (B, P) margins.

    ``delta = beta * ((logp[:, 2j] - ref[:, 2j]) - (logp[:, 2j+1] - ref[:, 2j+1]))``;
    column pair 0 is (chosen, rejected), pair 1 is (a_1, a_2).
    """
    logratio = logps - ref_logps  # (B, 2P)
    return beta * (logratio[:, 0::2] - logratio[:, 1::2])


def self_g(frozen_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """The frozen policy's implied preference ``sigma(delta_frozen)`` for every pair, (B, P), no grad."""
    with torch.no_grad():
        return sigmoid(dpo_margins(frozen_logps, ref_logps, beta))


def vrpo_objective(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    beta: float,
    lam: float,
    Z: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    g_aux: torch.Tensor | None = None,
) -> torch.Tensor:
    """VRPO loss of a batch (scalar), via :func:`vrpo.loss.vr_objective`.

    - ``logps, ref_logps``: (B, 4) policy and reference log-probs of
      (chosen, rejected, a_1, a_2); (B, 2) suffices when ``lam == 0`` (DPO).
    - ``Z``: (B,) labels, default 1 (chosen preferred); ``g``: (B,) auxiliary
      P(chosen > rejected); ``g_aux``: (B,) auxiliary P(a_1 > a_2).
    ``lam = 0`` gives DPO's ``mean(-log sigma(delta))`` exactly.
    """
    margins = dpo_margins(logps, ref_logps, beta)  # (B, P)
    delta = margins[:, 0]  # (B,)
    if Z is None:
        Z = torch.ones_like(delta)
    if isinstance(lam, (int, float)) and lam == 0:
        return vr_objective(delta, Z, lam=0.0)
    if margins.shape[1] < 2:
        raise ValueError("VRPO with lam != 0 needs log-probs of the extra pair (a_1, a_2): logps of shape (B, 4)")
    delta_aux = margins[:, 1]  # (B,)
    return vr_objective(delta, Z, g, delta_aux, g_aux, lam=lam)

