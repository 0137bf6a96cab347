"""DPO/VRPO on a causal LM: padded batches, sequence log-probs, margins, the loss, online ``lam``.

:func:`vrpo_loss` hands the DPO margins ``delta = beta * (log pi/pi_ref (y1) - log pi/pi_ref (y2))``
to :func:`vrpo.loss.vr_objective` (docs/method.md s2, "One stage"; logistic ``l``, soft label ``q``):
``L = mean_i[l(delta_i, q) - lam l(delta_i, g_i)] + lam mean_{i,m} l(delta_im, g_im)``.

Kept here because TRL 1.16 has no equivalent: the shared-prompt forward, which encodes each
prompt once and continues its KV cache with all ``K = 2 + 2M`` responses (gradients flow through
the prompt's keys and values; TRL runs one ``prompt + response`` row per response). Responses:
``[chosen, rejected, a_1[0], a_2[0], a_1[1], ...]``, pair ``j`` = columns ``(2j, 2j+1)``. Layouts:
``prompt_input_ids`` (B, Tp) left-padded, ``completion_input_ids`` (B*K, Tr) right-padded, with
``*_attention_mask``; naive: ``input_ids`` (B*K, T) left-padded rows, ``attention_mask``,
``completion_mask`` (B*K, Tr) over the last ``Tr`` positions.
"""

from __future__ import annotations

import inspect

import torch

from vrpo.loss import sigmoid, vr_objective

__all__ = ["left_pad", "pad_batch", "sequence_logps", "pair_margins", "soft_label", "vrpo_loss", "PowerTuning"]


def left_pad(seqs: list[list[int]], pad_id: int, right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> padded ids and attention mask, both (N, max length); left-padded unless ``right``."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for j, s in enumerate(seqs):
        where = slice(0, len(s)) if right else slice(T - len(s), T)
        ids[j, where], mask[j, where] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def pad_batch(prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
              shared_prompt: bool) -> dict[str, torch.Tensor]:
    """Token ids -> padded tensors (layout in the module docstring). ``responses[i]``: K lists per example."""
    flat = [r for rs in responses for r in rs]  # B*K
    if shared_prompt:
        (pids, pmask), (rids, rmask) = left_pad(prompts, pad_id), left_pad(flat, pad_id, right=True)  # (B, Tp), (BK, Tr)
        return {"prompt_input_ids": pids, "prompt_attention_mask": pmask,
                "completion_input_ids": rids, "completion_attention_mask": rmask}
    ids, mask = left_pad([p + r for p, rs in zip(prompts, responses) for r in rs], pad_id)  # (B*K, T)
    rlen = torch.tensor([len(r) for r in flat])  # (B*K,)
    Tr = int(rlen.max())
    cmask = (torch.arange(Tr)[None, :] >= (Tr - rlen)[:, None]).long()  # (B*K, Tr): responses end at T-1
    return {"input_ids": ids, "attention_mask": mask, "completion_mask": cmask}


def _cache_arg(model) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    inner = getattr(model, "module", model)  # DDP
    inner = getattr(inner, "get_base_model", lambda: inner)()  # PEFT
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` in float32 without storing a second (N, T, V) tensor.

    logits (N, T, V), targets (N, T) -> (N, T)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _naive(model, batch: dict) -> torch.Tensor:
    ids, mask, cmask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    Tr = cmask.shape[1]
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # (BK, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=Tr + 1)
    lp = _token_logps(out.logits[:, :-1], ids[:, -Tr:])  # (BK, Tr): position t predicts token t+1
    return (lp * cmask).sum(1)  # (BK,)


def _shared(model, batch: dict) -> torch.Tensor:
    pids, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]  # (B, Tp)
    rids, rmask = batch["completion_input_ids"], batch["completion_attention_mask"]  # (BK, Tr)
    K = rids.shape[0] // pids.shape[0]
    ppos = (pmask.cumsum(1) - 1).clamp(min=0)  # (B, Tp)
    out_p = model(input_ids=pids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
    cache = out_p.cache if getattr(out_p, "cache", None) is not None else out_p.past_key_values
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(model).__name__} returned no repeatable KV cache ({type(cache).__name__}); "
                        "use shared_prompt=False for this model")
    cache.batch_repeat_interleave(K)  # every layer's K/V: (B, H, Tp, hd) -> (B*K, H, Tp, hd)
    rpos = pmask.sum(1).repeat_interleave(K)[:, None] + torch.arange(rids.shape[1], device=rids.device)  # (BK, Tr)
    full_mask = torch.cat([pmask.repeat_interleave(K, dim=0), rmask], dim=1)  # (BK, Tp+Tr)
    out_r = model(input_ids=rids, attention_mask=full_mask, position_ids=rpos, use_cache=True,
                  **{_cache_arg(model): cache})
    # the first response token is scored by the prompt's last logit
    logits = torch.cat([out_p.logits.repeat_interleave(K, dim=0), out_r.logits[:, :-1]], dim=1)  # (BK, Tr, V)
    return (_token_logps(logits, rids) * rmask).sum(1)  # (BK,)


def sequence_logps(model, batch: dict, K: int) -> torch.Tensor:
    """(B, K) summed response log-probs of a :func:`pad_batch` batch (either layout)."""
    return (_shared if "prompt_input_ids" in batch else _naive)(model, batch).view(-1, K)


def pair_margins(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit-reward margins per pair: (B, 2P) log-probs -> (B, P).

    ``delta_j = beta * ((logp[:, 2j] - ref[:, 2j]) - (logp[:, 2j+1] - ref[:, 2j+1]))``;
    pair 0 is (chosen, rejected), pair ``1 + m`` is ``(a_1[m], a_2[m])``.
    """
    logratio = logps - ref_logps  # (B, 2P)
    return beta * (logratio[:, 0::2] - logratio[:, 1::2])


def soft_label(loss_type: str, label_smoothing: float) -> float:
    """Soft label ``q`` of the labelled pair (chosen preferred) for ``l(delta, q)``, the logistic loss.

    - ``sigmoid``: conservative DPO (cDPO), ``q = 1 - eps`` (``eps = 0`` is DPO);
    - ``robust``: robust DPO (rDPO), ``q = (1 - eps) / (1 - 2 eps)``: TRL's
      ``(-(1-eps) log s(d) + eps log s(-d)) / (1 - 2 eps)`` is exactly ``l(d, q)``, the label
      debiased for flips at rate ``eps`` (``q > 1`` is intended).
    """
    eps = float(label_smoothing)
    if loss_type == "sigmoid":
        return 1.0 - eps
    if loss_type == "robust":
        return (1.0 - eps) / (1.0 - 2.0 * eps)
    raise ValueError(f"no soft label for loss_type {loss_type!r}; VRPO supports 'sigmoid' and 'robust'")


def vrpo_loss(margins: torch.Tensor, q: float, lam: float, g: torch.Tensor | None = None,
              g_aux: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar VRPO loss via :func:`vrpo.loss.vr_objective` (logistic ``l``).

    ``margins`` (B, 1 + M): labelled pair then the M extra pairs (only column 0 is read
    when ``lam == 0``); ``g`` (B,) P(chosen > rejected); ``g_aux`` (B, M) P(a_1[m] > a_2[m]).
    ``lam = 0`` and ``q = 1`` give DPO's ``mean(-log sigma(delta))`` exactly.
    """
    delta = margins[:, 0]  # (B,)
    Z = torch.full_like(delta, q)
    if lam == 0:
        return vr_objective(delta, Z, lam=0.0)
    return vr_objective(delta, Z, g, margins[:, 1:], g_aux, lam=lam)


class PowerTuning:
    """Online ``lam`` for VRPO: running moments of per-pair loss derivatives (docs/vrpo_trainer.md, "lam = auto").

    Per example ``i`` with ``s = sigma(delta)``: ``u_i = s_i - q``, ``w_i = s_i - g_i``,
    ``e_im = s_im - g_im``. The minibatch gradient of ``L`` in implicit-reward space
    (one coordinate per response) has variance proportional to
    ``E[(u - lam w)^2] + lam^2 E[sum_m e_m^2] / M^2``, minimised by

        lam* = E[u w] / (E[w^2] + E[sum_m e_m^2] / M^2),

    estimated from sums decayed by ``decay`` per optimisation step (``1`` = plain running
    sums) and clipped to [0, 1]. The value used in step ``t`` comes from steps ``< t`` only
    (0 at the first step), so it does not depend on the minibatch it weights.
    """

    def __init__(self, decay: float = 0.99):
        self.decay = float(decay)
        self.sums = [0.0, 0.0, 0.0]  # sum u w, sum w^2, sum (sum_m e_m^2) / M^2
        self.lam_raw = 0.0

    @staticmethod
    def batch_sums(margins: torch.Tensor, q, g: torch.Tensor, g_aux: torch.Tensor) -> torch.Tensor:
        """(3,) sums over a batch; margins (B, 1 + M), q scalar or (B,), g (B,), g_aux (B, M)."""
        s = sigmoid(margins.detach().double())  # (B, 1 + M)
        u, w = s[:, 0] - q, s[:, 0] - g.double()  # (B,)
        e = s[:, 1:] - g_aux.double()  # (B, M)
        return torch.stack([(u * w).sum(), (w * w).sum(), (e * e).sum() / e.shape[1] ** 2])

    def update(self, step_sums) -> float:
        """Fold one step's (all-process) sums in and return the clipped ``lam`` for the next step."""
        self.sums = [self.decay * a + float(b) for a, b in zip(self.sums, step_sums)]
        den = self.sums[1] + self.sums[2]
        self.lam_raw = self.sums[0] / den if den > 0 else 0.0
        return self.lam

    @property
    def lam(self) -> float:
        return min(1.0, max(0.0, self.lam_raw))
