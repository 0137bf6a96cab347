"""Evaluation on generations, shared by the LM experiments: sampling with log-probs, gold win
rates, KL from samples, implicit-reward accuracy under ``p*``, and the gradient-variance probe.

Everything here is exact under a known preference ``p*`` (no judge):

- :func:`sample` draws responses by ancestral sampling (temperature 1, no top-k/top-p, so the
  samples are draws from the policy itself) and returns each response's token ids and its
  log-probability under the sampling model; batches are seeded from ``(seed, batch index)``.
- :func:`win_rate`: ``W(A, B) = E_x E_{y~A, y'~B} p*(x, y, y')`` as the mean of ``p*`` over
  independent sample pairs, with its Monte Carlo error clustered by prompt.
- :func:`kl_from_samples`: ``KL(pi || pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)]``.
- :func:`expected_accuracy`: ``E[1{delta > 0} p* + 1{delta < 0} (1 - p*)]`` on held-out pairs,
  the accuracy of the implicit reward against a label drawn from ``p*``, in expectation.
- :func:`gradient_probe`: trace of the covariance of minibatch gradients of the DPO and the
  VRPO objective at fixed parameters, paired on the same minibatches; and
  :func:`closed_form_at_ref`, the ratio predicted at ``pi_ref`` (docs/llm_regret.md, "closed form").

For the policy demo, which has no known ``p*`` and trains on a
:class:`llm.vrpo_trainer.VRPOTrainer`'s prepared rows: :func:`implicit_reward_accuracy`,
:func:`judge_win_rate` (a learned judge's rewards) and :func:`gradient_variance_probe`.

Log-probs of given responses go through :func:`llm.vrpo_loss.sequence_logps` (the trainer's
forward) and losses through :func:`vrpo.loss.vr_objective` (the one definition of the loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vrpo.loss import sigmoid, vr_objective
from vrpo_common.stats import Z95, mean_ci, mean_se

from .vrpo_loss import pair_margins, sequence_logps, vrpo_loss

__all__ = [
    "Samples",
    "sample",
    "response_logps",
    "win_rate",
    "kl_from_samples",
    "expected_accuracy",
    "implicit_margins",
    "gradient_probe",
    "pair_gradients_at_ref",
    "closed_form_at_ref",
    "closed_form_from_moments",
    "fixed_assignment_ratio",
    "auto_device",
    "implicit_reward_accuracy",
    "judge_win_rate",
    "gradient_variance_probe",
]


def auto_device(device: str = "auto") -> str:
    """``"cuda"`` when a GPU is visible and ``device == "auto"``, else ``"cpu"`` (or ``device`` as given)."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- sampling


@dataclass
class Samples:
    """``n_per_prompt`` responses per prompt, prompt-major: row ``r = i * n_per_prompt + k``.

    ``ids[r]``: response token ids (the EOS token included when it was generated, so a response is
    never an empty token list); ``logp (R,)``: summed log-prob under the sampling model;
    ``ended (R,)``: EOS generated; ``n_tokens (R,)``: ``len(ids[r])``.
    """

    ids: list
    logp: np.ndarray
    ended: np.ndarray
    n_per_prompt: int

    @property
    def n_tokens(self) -> np.ndarray:
        return np.array([len(r) for r in self.ids], dtype=np.int64)

    def texts(self, tokenizer) -> list[str]:
        """Decoded responses without the EOS token and without one leading space (data convention)."""
        eos = tokenizer.eos_token_id
        out = []
        for r in self.ids:
            t = tokenizer.decode([i for i in r if i != eos], skip_special_tokens=True)
            out.append(t[1:] if t.startswith(" ") else t)
        return out

    def to_arrays(self) -> dict:
        """Flat arrays for ``np.savez`` (token ids concatenated, with offsets)."""
        lens = self.n_tokens
        return {"flat_ids": np.concatenate([np.asarray(r, np.int64) for r in self.ids]) if self.ids else
                np.zeros(0, np.int64), "lens": lens, "logp": self.logp, "ended": self.ended,
                "n_per_prompt": np.int64(self.n_per_prompt)}

    @classmethod
    def from_arrays(cls, a) -> "Samples":
        offs = np.concatenate([[0], np.cumsum(a["lens"])])
        ids = [a["flat_ids"][offs[i]:offs[i + 1]].tolist() for i in range(len(a["lens"]))]
        return cls(ids, np.asarray(a["logp"], float), np.asarray(a["ended"], bool), int(a["n_per_prompt"]))


def _left_pad(seqs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`llm.vrpo_loss.left_pad` on ``device``: (N, T) ids and attention mask."""
    from .vrpo_loss import left_pad

    ids, mask = left_pad(list(seqs), pad_id)
    return ids.to(device), mask.to(device)


def _cache_kw(model, out) -> tuple[str, object]:
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return name, cache


@torch.no_grad()
def sample(model, prompt_ids: list, n_per_prompt: int, max_new_tokens: int, eos_id: int, pad_id: int,
           seed: int, batch_size: int = 256, progress: bool = False, desc: str = "sampling") -> Samples:
    """Ancestral sampling (temperature 1) of ``n_per_prompt`` responses per prompt, with log-probs.

    ``prompt_ids``: list of token-id lists (already truncated). Rows are prompt-major and cut into
    batches of ``batch_size``; batch ``b`` uses ``torch.Generator().manual_seed(seed * 1_000_003 + b)``,
    so the samples depend on the model, the prompts, ``seed`` and ``batch_size`` only. A row stops
    at EOS (included) or after ``max_new_tokens`` tokens.
    """
    from tqdm.auto import tqdm

    if n_per_prompt < 1 or max_new_tokens < 1:
        raise ValueError("n_per_prompt and max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = [i for i in range(len(prompt_ids)) for _ in range(n_per_prompt)]
    ids_out: list = [None] * len(rows)
    logp_out = np.zeros(len(rows))
    ended_out = np.zeros(len(rows), bool)
    starts = list(range(0, len(rows), batch_size))
    for b, s in enumerate(tqdm(starts, desc=desc, disable=not progress, mininterval=2)):
        chunk = rows[s:s + batch_size]
        B = len(chunk)
        gen = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + b)
        ids, mask = _left_pad([prompt_ids[i] for i in chunk], pad_id, device)  # (B, Tp)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache_name, cache = _cache_kw(model, out)
        logits = out.logits[:, -1]  # (B, V)
        toks = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
        lps = torch.zeros((B, max_new_tokens), dtype=torch.float64, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        length = torch.zeros(B, dtype=torch.long, device=device)
        last_pos = pos[:, -1]
        for t in range(max_new_tokens):
            logp_all = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
            tok = torch.multinomial(logp_all.exp(), 1, generator=gen)  # (B, 1)
            toks[:, t] = tok[:, 0]
            lps[:, t] = logp_all.gather(1, tok)[:, 0].double() * alive
            length += alive.long()
            alive = alive & (tok[:, 0] != eos_id)
            if not bool(alive.any()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            out = model(input_ids=tok, attention_mask=mask, position_ids=last_pos[:, None], use_cache=True,
                        **{cache_name: cache})
            cache_name, cache = _cache_kw(model, out)
            logits = out.logits[:, -1]
        L = length.cpu().numpy()
        T = toks.cpu().numpy()
        lp = lps.sum(1).cpu().numpy()
        for j, r in enumerate(range(s, s + B)):
            ids_out[r] = T[j, :L[j]].tolist()
            logp_out[r] = lp[j]
            ended_out[r] = bool(L[j] > 0 and T[j, L[j] - 1] == eos_id)
    model.train(was_training)
    return Samples(ids_out, logp_out, ended_out, n_per_prompt)


def _batch(prompts, responses, pad_id: int, device, shared_prompt: bool = True) -> dict:
    from .vrpo_loss import pad_batch

    return {k: v.to(device) for k, v in pad_batch(prompts, responses, pad_id, shared_prompt).items()}


def _seq_logps(model, prompts, responses, pad_id: int, device) -> torch.Tensor:
    """(B, K) summed log-probs of ``responses[i]`` (K each) after ``prompts[i]``, with gradients if enabled."""
    from .vrpo_loss import sequence_logps

    return sequence_logps(model, _batch(prompts, responses, pad_id, device), len(responses[0])).float()


@torch.no_grad()
def response_logps(model, prompt_ids: list, response_ids: list, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """``(n, K)`` summed log-probs of ``response_ids[i]`` (K token-id lists each) given ``prompt_ids[i]``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        out.append(_seq_logps(model, prompt_ids[s:s + batch_size], response_ids[s:s + batch_size], pad_id,
                              device).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, len(response_ids[0]) if response_ids else 0))


# --------------------------------------------------------------------------- gold metrics


def _clustered(per_prompt: np.ndarray) -> dict:
    m, se = mean_se(per_prompt)
    return {"mean": m, "se": se, "lo": m - Z95 * se, "hi": m + Z95 * se, "n_prompts": int(np.size(per_prompt))}


def win_rate(P: np.ndarray) -> dict:
    """Gold win rate from ``P (J, ...)``: ``p*(x_j, y, y')`` over independent sample pairs of prompt ``j``.

    Mean over pairs within a prompt, then over prompts; the Monte Carlo SE is clustered by prompt
    (prompts are the independent units). Returns ``{mean, se, lo, hi, n_prompts, per_prompt}``.
    """
    P = np.asarray(P, float)
    if P.ndim < 1 or P.shape[0] < 2:
        raise ValueError(f"need p* for >= 2 prompts, got shape {P.shape}")
    if not np.all((P >= 0) & (P <= 1)):
        raise ValueError("p* values must lie in [0, 1]")
    per = P.reshape(P.shape[0], -1).mean(axis=1)  # (J,)
    return {**_clustered(per), "per_prompt": per}


def kl_from_samples(logp_pi: np.ndarray, logp_ref: np.ndarray) -> dict:
    """``KL(pi || pi_ref)`` estimated by ``mean(log pi(y) - log pi_ref(y))`` over ``y ~ pi``; ``(J, S)`` arrays.

    Unbiased (it can be slightly negative in a finite sample); SE clustered by prompt.
    """
    d = np.asarray(logp_pi, float) - np.asarray(logp_ref, float)
    if not np.all(np.isfinite(d)):
        raise ValueError("non-finite log-probs in the KL estimate")
    per = d.reshape(d.shape[0], -1).mean(axis=1)
    return _clustered(per)


def expected_accuracy(delta: np.ndarray, p: np.ndarray) -> dict:
    """Expected accuracy of margins ``delta`` against labels ``Z ~ Bernoulli(p)``: ``(J,)`` pairs, one per prompt.

    ``E[acc] = 1{delta > 0} p + 1{delta < 0} (1 - p) + 1{delta = 0} / 2``. Also the best achievable
    (``max(p, 1 - p)``) for reference.
    """
    delta, p = np.asarray(delta, float), np.asarray(p, float)
    acc = np.where(delta > 0, p, np.where(delta < 0, 1 - p, 0.5))
    per = acc.reshape(acc.shape[0], -1).mean(axis=1)
    best = np.maximum(p, 1 - p).reshape(acc.shape[0], -1).mean(axis=1)
    return {**_clustered(per), "bayes": float(best.mean())}


def implicit_margins(model, prompt_ids, pair_ids, ref_logps: np.ndarray, beta: float, pad_id: int,
                     batch_size: int = 64) -> np.ndarray:
    """``delta = beta [(log pi - log pi_ref)(y1) - (log pi - log pi_ref)(y2)]`` for pairs ``pair_ids[i] = [y1, y2]``."""
    lp = response_logps(model, prompt_ids, pair_ids, pad_id, batch_size)  # (n, 2)
    r = lp - np.asarray(ref_logps, float)[:, :2]
    return beta * (r[:, 0] - r[:, 1])


# --------------------------------------------------------------------------- gradient-variance probe


def _flat_grad(loss, params, retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def gradient_probe(model, prompt_ids, response_ids, ref_logps, Z, g, g_aux, beta: float, lam: float, pad_id: int,
                   batch_size: int, n_pairs: int, seed: int, n_boot: int = 2000, p_label=None, replace: bool = False,
                   progress: bool = False, desc: str = "gradient probe") -> dict:
    """Trace of the minibatch-gradient covariance of DPO (``lam = 0``) and VRPO (``lam``) at fixed parameters.

    Data: ``response_ids[i] = [y1, y2, a_1[0], a_2[0], ...]`` (``K = 2 + 2M``), ``ref_logps (n, K)``,
    labels ``Z (n,)`` in [0, 1] for ``(y1, y2)``, ``g (n,)``, ``g_aux (n, M)``. ``2 n_pairs`` minibatches of
    ``batch_size`` distinct examples are drawn (seeded); on each both objectives' gradients come from one
    forward. Each disjoint pair of minibatches gives the unbiased estimate ``||G_a - G_b||^2 / 2`` of
    ``tr Cov(G)``; the ratio VRPO/DPO has a paired bootstrap interval over the minibatch pairs. With
    ``p_label (n,)`` the labels are redrawn ``Z ~ Bernoulli(p_label)`` for every drawn example (the label noise
    integrated, as in the closed form); ``replace=True`` draws a minibatch's examples with replacement, so its
    covariance is exactly the per-example covariance over ``B``. Because
    ``G_VRPO(lam) = G_DPO + lam * D`` is linear in ``lam``, the trace at any ``lam`` follows from the same
    draws: ``v(lam) = v_D + 2 lam c + lam^2 v_Delta``; reported: ``lam_opt = -c / v_Delta`` (clipped to [0, 1])
    and the ratio there.
    """
    from tqdm.auto import tqdm

    n = len(prompt_ids)
    if batch_size > n and not replace:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} examples")
    K = len(response_ids[0])
    M = (K - 2) // 2
    if M < 1:
        raise ValueError("the probe needs the extra pairs (K = 2 + 2M responses per example)")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    ref_all = torch.as_tensor(np.asarray(ref_logps, float)[:, :K], dtype=torch.float32)
    Z_all = torch.as_tensor(np.asarray(Z, float), dtype=torch.float32)
    g_all = torch.as_tensor(np.asarray(g, float), dtype=torch.float32)
    ga_all = torch.as_tensor(np.asarray(g_aux, float).reshape(n, -1)[:, :M], dtype=torch.float32)
    vD, vX, cDX = [], [], []  # per minibatch pair: ||dG_D||^2/2, ||dD||^2/2, <dG_D, dD>/2
    prev = None
    mean_D = mean_V = None
    for r in tqdm(range(2 * n_pairs), desc=desc, disable=not progress, mininterval=2):
        idx = rng.choice(n, size=batch_size, replace=replace).tolist()
        lp = _seq_logps(model, [prompt_ids[i] for i in idx], [response_ids[i] for i in idx], pad_id, device)
        ref = ref_all[idx].to(device)
        lr_ = lp - ref  # (B, K)
        margins = beta * (lr_[:, 0::2] - lr_[:, 1::2])  # (B, 1 + M)
        Zb, gb, gab = Z_all[idx].to(device), g_all[idx].to(device), ga_all[idx].to(device)
        if p_label is not None:  # fresh labels for these draws
            Zb = torch.as_tensor(rng.random(batch_size) < np.asarray(p_label, float)[idx], dtype=torch.float32,
                                 device=device)
        G_D = _flat_grad(vr_objective(margins[:, 0], Zb, lam=0.0), params, retain=True).double()
        G_1 = _flat_grad(vr_objective(margins[:, 0], Zb, gb, margins[:, 1:], gab, lam=1.0), params,
                         retain=False).double()
        Dl = G_1 - G_D  # the correction per unit lam
        mean_D = G_D / (2 * n_pairs) if mean_D is None else mean_D + G_D / (2 * n_pairs)
        G_V = G_D + lam * Dl
        mean_V = G_V / (2 * n_pairs) if mean_V is None else mean_V + G_V / (2 * n_pairs)
        if r % 2 == 1:
            a, b = G_D - prev[0], Dl - prev[1]
            vD.append(float(a @ a) / 2)
            vX.append(float(b @ b) / 2)
            cDX.append(float(a @ b) / 2)
        prev = (G_D, Dl)
    model.train(was_training)
    vD, vX, cDX = np.array(vD), np.array(vX), np.array(cDX)

    def ratio(lam_, i=slice(None)):
        return (vD[i].mean(-1) + 2 * lam_ * cDX[i].mean(-1) + lam_ ** 2 * vX[i].mean(-1)) / vD[i].mean(-1)

    lam_opt = float(np.clip(-cDX.mean() / vX.mean(), 0.0, 1.0)) if vX.mean() > 0 else 0.0
    boot = rng.integers(0, n_pairs, size=(n_boot, n_pairs))
    r_l, r_o = ratio(lam, boot), ratio(lam_opt, boot)
    vV = vD + 2 * lam * cDX + lam ** 2 * vX
    return {
        "lam": float(lam), "beta": beta, "batch_size": batch_size, "n_minibatches": 2 * n_pairs, "M": M,
        "trace_dpo": float(vD.mean()), "trace_dpo_se": mean_se(vD)[1],
        "trace_vrpo": float(vV.mean()), "trace_vrpo_se": mean_se(vV)[1],
        "ratio": float(ratio(lam)), "ratio_lo": float(np.quantile(r_l, 0.025)),
        "ratio_hi": float(np.quantile(r_l, 0.975)), "ratio_se": float(r_l.std(ddof=1)),
        "lam_opt": lam_opt, "ratio_at_lam_opt": float(ratio(lam_opt)),
        "ratio_at_lam_opt_lo": float(np.quantile(r_o, 0.025)), "ratio_at_lam_opt_hi": float(np.quantile(r_o, 0.975)),
        "mean_grad_norm_dpo": float(mean_D.norm()), "mean_grad_norm_vrpo": float(mean_V.norm()),
    }


def pair_gradients_at_ref(model, prompt_ids, response_ids, beta: float, pad_id: int, combos: dict, Ms=(),
                          progress: bool = False, desc: str = "per-pair gradients at pi_ref") -> dict:
    """Moments of the per-pair margin gradients ``X = grad delta`` at ``pi_ref`` (where ``delta = 0``).

    ``response_ids[i] = [y1, y2, a_1[0], a_2[0], ...]``: every prompt has ``P = K / 2`` pairs from
    ``pi_ref``. ``combos``: ``name -> (p_star (n, P), g (n, P))``, the gold and auxiliary probabilities
    of every pair (``g = p_star`` for the oracle); the gradients are computed once (one backward per
    pair) and reused for every combination. The policy must *be* ``pi_ref`` (then ``delta`` is
    ``beta (log pi(y1) - log pi(y2))`` up to a constant and only its gradient matters). Returns
    ``name -> moments`` with per-prompt sums (``a = (p* - 1/2) X``, ``b = (g - 1/2) X``): ``xx = sum |X|^2``,
    ``ab_xx = sum (p*-1/2)(g-1/2)|X|^2``, ``bb = sum |b|^2``, the within-prompt cross products
    ``bb_cross = sum_{j != k} b_j . b_k``, ``ab_cross = sum_{j != k} a_j . b_k``, and ``sum_a``
    (for the mean gradient), as :func:`closed_form_from_moments` reads them. For every ``M`` in ``Ms`` also the
    sums of the *fixed assignment* (pair 0 labelled, pairs ``1..M`` its extra pairs, as in the data), read by
    :func:`fixed_assignment_ratio`.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(prompt_ids)
    P = len(response_ids[0]) // 2
    cs = {k: (np.asarray(ps, float).reshape(n, P) - 0.5, np.asarray(g, float).reshape(n, P) - 0.5)
          for k, (ps, g) in combos.items()}
    out = {k: {"n_prompts": n, "pairs_per_prompt": P, **{f: np.zeros(n) for f in
                                                           ("xx", "ab_xx", "bb", "bb_cross", "ab_cross")},
               "sum_a": None, "fixed": {int(M): {"x00": 0.0, "aGc": 0.0, "cGc": 0.0, "v_a": None, "v_u": None}
                                         for M in Ms}} for k in combos}
    was_training = model.training
    model.eval()
    for i in tqdm(range(n), desc=desc, disable=not progress, mininterval=2):
        lp = _seq_logps(model, [prompt_ids[i]], [response_ids[i]], pad_id, device)[0]  # (K,)
        X = torch.stack([beta * _flat_grad(lp[2 * j] - lp[2 * j + 1], params, retain=j < P - 1).double()
                         for j in range(P)])  # (P, d)
        G = X @ X.T  # (P, P) Gram matrix: everything below is a quadratic form in it
        xx = G.diagonal().cpu().numpy()
        Gn = G.cpu().numpy()
        off = ~np.eye(P, dtype=bool)
        for k, (ca, cb) in cs.items():
            o = out[k]
            a, b = ca[i], cb[i]  # (P,)
            o["xx"][i] = xx.sum()
            o["ab_xx"][i] = float((a * b * xx).sum())
            o["bb"][i] = float((b * b * xx).sum())
            o["bb_cross"][i] = float((np.outer(b, b) * Gn)[off].sum())
            o["ab_cross"][i] = float((np.outer(a, b) * Gn)[off].sum())
            sa = (torch.as_tensor(a, dtype=X.dtype, device=X.device)[:, None] * X).sum(0).cpu()
            o["sum_a"] = sa if o["sum_a"] is None else o["sum_a"] + sa
            for M, f in o["fixed"].items():  # u = (g_0 - 1/2) X_0 - (1/M) sum_{m=1..M} (g_m - 1/2) X_m
                c = np.zeros(P)
                c[0] = b[0]
                c[1:1 + M] = -b[1:1 + M] / M
                Gc = Gn @ c
                f["x00"] += Gn[0, 0]
                f["aGc"] += a[0] * Gc[0]
                f["cGc"] += float(c @ Gc)
                va = (a[0] * X[0]).cpu()
                vu = (torch.as_tensor(c, dtype=X.dtype, device=X.device)[:, None] * X).sum(0).cpu()
                f["v_a"] = va if f["v_a"] is None else f["v_a"] + va
                f["v_u"] = vu if f["v_u"] is None else f["v_u"] + vu
    model.train(was_training)
    return out


def fixed_assignment_ratio(mom: dict, M: int, lam: float = 1.0) -> dict:
    """The VRPO/DPO per-example gradient-variance ratio at ``pi_ref`` on the probed examples themselves.

    The population is the ``n`` examples as they are (pair 0 labelled, pairs ``1..M`` extra), each drawn
    with probability ``1/n`` and its label ``Z ~ Bernoulli(p*)``: with ``u = (g_0 - 1/2) X_0 - (1/M)
    sum_m (g_m - 1/2) X_m``, ``E_Z|psi_DPO|^2 = |X_0|^2/4`` and ``E_Z|psi_VRPO|^2 = |X_0|^2/4 - 2 lam (p*_0 - 1/2)
    X_0 . u + lam^2 |u|^2``, the means ``-mean (p*_0 - 1/2) X_0`` and ``that + lam mean u``. This is exactly what
    :func:`gradient_probe` estimates with ``p_label`` and ``replace=True`` on the same examples, so the two
    differ only by the probe's Monte Carlo error (the check of the derivation and the code).
    """
    f = mom["fixed"][int(M)]
    n = mom["n_prompts"]
    va, vu = f["v_a"].double(), f["v_u"].double()
    tr_d = f["x00"] / (4 * n) - float(va @ va) / n ** 2
    mean_v = (-va + lam * vu) / n
    tr_v = (f["x00"] / 4 - 2 * lam * f["aGc"] + lam ** 2 * f["cGc"]) / n - float(mean_v @ mean_v)
    return {"ratio": tr_v / tr_d, "trace_dpo_per_example": tr_d, "trace_vrpo_per_example": tr_v, "n": n, "M": M,
            "lam": lam}


def closed_form_from_moments(mom: dict, M: int, lam: float = 1.0) -> dict:
    """The VRPO/DPO minibatch-gradient variance ratio at ``pi_ref`` (docs/llm_regret.md, "closed form").

    At ``pi_ref`` every margin is 0, so the per-example gradients are ``psi_DPO = -(Z - 1/2) X`` and
    ``psi_VRPO = psi_DPO + lam [(g - 1/2) X - (1/M) sum_m (g_m - 1/2) X_m]``. With ``E (Z - 1/2)^2 = 1/4``:

        tr Cov psi_DPO     = E|X|^2 / 4 - |mu|^2,                mu = E[(p* - 1/2) X]
        tr Cov psi_VRPO    = tr Cov psi_DPO - 2 lam (C - A_b) + lam^2 (1 + 1/M) (S_b - B_b)

    with ``C = E[(p*-1/2)(g-1/2)|X|^2]``, ``S_b = E[(g-1/2)^2 |X|^2]``, ``B_b = E_x|E[(g-1/2)X | x]|^2``,
    ``A_b = E_x[E[(p*-1/2)X | x] . E[(g-1/2)X | x]]``. For the oracle ``g = p*`` and ``lam = 1``:
    ``ratio = 1 - (1 - 1/M) E_x tr Cov((p*-1/2) X | x) / tr Cov psi_DPO`` (docs/method.md s3 with ``s = 1/2``),
    and the best ``lam`` is ``M / (M + 1)``. Every moment is a mean over prompts of per-prompt
    sums from :func:`pair_gradients_at_ref`; cross-prompt terms use distinct prompts only
    (unbiased). SEs by the jackknife over prompts.
    """
    n, P = mom["n_prompts"], mom["pairs_per_prompt"]
    if n < 3 or P < 2:
        raise ValueError("the closed form needs >= 3 prompts with >= 2 pairs each")

    def parts(keep: np.ndarray) -> dict:
        w = keep.sum()
        xx = mom["xx"][keep].sum() / (w * P)
        C = mom["ab_xx"][keep].sum() / (w * P)
        S = mom["bb"][keep].sum() / (w * P)
        Bb = mom["bb_cross"][keep].sum() / (w * P * (P - 1))
        Ab = mom["ab_cross"][keep].sum() / (w * P * (P - 1))
        return {"xx": xx, "C": C, "S_b": S, "B_b": Bb, "A_b": Ab}

    sa = mom["sum_a"].double()
    # |mu|^2 as |mean a|^2: biased up by tr Cov(a-bar)/n, O(1/n) against tr Cov psi_DPO (held fixed in the jackknife)
    mu2 = float(sa @ sa) / (n * P) ** 2

    def ratio_from(pt: dict, mu2: float, lam_: float) -> tuple[float, float, float]:
        tr_d = pt["xx"] / 4 - mu2
        tr_v = tr_d - 2 * lam_ * (pt["C"] - pt["A_b"]) + lam_ ** 2 * (1 + 1 / M) * (pt["S_b"] - pt["B_b"])
        return tr_v / tr_d, tr_d, tr_v

    keep = np.ones(n, bool)
    full = parts(keep)
    r, tr_d, tr_v = ratio_from(full, mu2, lam)
    denom = (1 + 1 / M) * (full["S_b"] - full["B_b"])
    lam_opt = float(np.clip((full["C"] - full["A_b"]) / denom, 0, 1)) if denom > 0 else 0.0
    r_opt = ratio_from(full, mu2, lam_opt)[0]
    jk, jk_opt = [], []
    for i in range(n):
        k = keep.copy()
        k[i] = False
        jk.append(ratio_from(parts(k), mu2, lam)[0])
        jk_opt.append(ratio_from(parts(k), mu2, lam_opt)[0])
    jk, jk_opt = np.array(jk), np.array(jk_opt)
    se = math.sqrt((n - 1) / n * np.sum((jk - jk.mean()) ** 2))
    se_opt = math.sqrt((n - 1) / n * np.sum((jk_opt - jk_opt.mean()) ** 2))
    return {"ratio": float(r), "ratio_se": se, "trace_dpo_per_example": float(tr_d),
            "trace_vrpo_per_example": float(tr_v), "lam": float(lam), "lam_opt": lam_opt,
            "ratio_at_lam_opt": float(r_opt), "ratio_at_lam_opt_se": se_opt, "M": M, "n_prompts": n,
            "moments": {k: float(v) for k, v in full.items()} | {"mu2": mu2}}


def closed_form_at_ref(model, prompt_ids, response_ids, beta: float, pad_id: int, p_star, g, M: int,
                       lam: float = 1.0, progress: bool = False) -> dict:
    """:func:`pair_gradients_at_ref` for one ``(p_star, g)`` then :func:`closed_form_from_moments` (per-example
    traces; a minibatch of ``B`` distinct examples divides both by ``B``, so the ratio is the minibatch probe's)."""
    mom = pair_gradients_at_ref(model, prompt_ids, response_ids, beta, pad_id, {"g": (p_star, g)},
                                progress=progress)["g"]
    return closed_form_from_moments(mom, M, lam)


# --------------------------------------------------------------------------- on a VRPO trainer's data (policy demo)
# The policy demo judges its samples with a learned reward (no known p*) and probes the
# gradients on a VRPOTrainer's prepared rows; the pieces below serve it.


@torch.no_grad()
def implicit_reward_accuracy(trainer, model, dataset=None) -> dict:
    """Share of held-out pairs (prepared by ``trainer`` with ``ref_logps``; default its ``eval_dataset``)
    with implicit-reward margin > 0 (chosen preferred): 95% CI and the per-pair ``correct`` array."""
    ds = trainer.eval_dataset if dataset is None else dataset
    logps = trainer.dataset_logps(ds, model=model)[:, :2]  # (n, 2)
    ref = torch.tensor(ds["ref_logps"][:], dtype=torch.float32)[:, :2]
    delta = pair_margins(logps, ref, trainer.beta)[:, 0]  # (n,)
    correct = ((delta > 0).float() + 0.5 * (delta == 0).float()).numpy()
    return {**mean_ci(correct), "correct": correct, "mean_margin": float(delta.mean())}


def judge_win_rate(r_a: np.ndarray, r_b: np.ndarray) -> dict:
    """Judge win rate of A over B. ``r_a, r_b``: (n_prompts, S) judge rewards of S samples per prompt.

    Win = ``1{r_a > r_b}`` (ties 1/2), samples paired by index; averaged within a prompt,
    then a normal 95% CI across prompts (prompts are the independent units). Also the
    mean judge probability ``sigma(r_a - r_b)``.
    """
    r_a, r_b = np.atleast_2d(r_a), np.atleast_2d(r_b)
    wins = ((r_a > r_b) + 0.5 * (r_a == r_b)).mean(axis=1)  # (n_prompts,)
    prob = sigmoid(r_a - r_b).mean(axis=1)
    return {**mean_ci(wins), "judge_prob": float(prob.mean())}


def gradient_variance_probe(model, trainer, lam: float, batch_size: int, n_pairs: int, seed: int,
                            n_boot: int = 2000, progress: bool = True, desc: str = "gradient variance") -> dict:
    """Variance of minibatch gradients of the DPO (``lam=0``) and VRPO objectives at fixed parameters.

    On ``2 * n_pairs`` minibatches of a VRPO trainer's training rows (extra pairs, ``g``,
    ``ref_logps``), the gradients of both objectives (same forward); each disjoint pair of
    minibatches gives the unbiased estimate ``v_j = ||G_2j - G_2j+1||^2 / 2`` of the trace of the
    minibatch-gradient covariance; the ratio VRPO/DPO of their means gets a paired bootstrap 95%
    CI over ``j``. Returns traces, ratio, CI and the norms of the mean gradients (the signal).
    """
    from tqdm.auto import tqdm

    ds = trainer.train_dataset
    if "g" not in ds.column_names or "ref_logps" not in ds.column_names or not trainer._n_extra_pairs:
        raise ValueError("the probe needs a VRPO trainer's data: extra pairs, g columns and ref_logps")
    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device
    rng = np.random.default_rng(seed)
    v = {"dpo": [], "vrpo": []}
    mean = {"dpo": 0.0, "vrpo": 0.0}
    prev = {}
    model.eval()
    for r in tqdm(range(2 * n_pairs), desc=desc, disable=not progress, mininterval=2):
        idx = rng.choice(len(ds), size=batch_size, replace=False).tolist()
        batch = {k: t.to(dev) for k, t in trainer.data_collator(ds.select(idx).to_list()).items()}
        margins = pair_margins(sequence_logps(model, batch, trainer._K).float(), batch["ref_logps"], trainer.beta)
        G = {
            "dpo": _flat_grad(vrpo_loss(margins, trainer._q, 0.0), params, retain=True),
            "vrpo": _flat_grad(vrpo_loss(margins, trainer._q, lam, batch["g"], batch["g_aux"]), params, retain=False),
        }
        for k in G:
            mean[k] = mean[k] + G[k].double() / (2 * n_pairs)
            if r % 2 == 1:
                v[k].append(float(((G[k] - prev[k]).double() ** 2).sum() / 2))
            prev[k] = G[k]
    vd, vv = np.array(v["dpo"]), np.array(v["vrpo"])
    boot = rng.integers(0, n_pairs, size=(n_boot, n_pairs))
    ratios = vv[boot].mean(1) / vd[boot].mean(1)
    return {
        "trace_dpo": float(vd.mean()), "trace_vrpo": float(vv.mean()),
        "trace_dpo_ci": mean_ci(vd), "trace_vrpo_ci": mean_ci(vv),
        "ratio": float(vv.mean() / vd.mean()),
        "ratio_lo": float(np.quantile(ratios, 0.025)), "ratio_hi": float(np.quantile(ratios, 0.975)),
        "mean_grad_norm_dpo": float(mean["dpo"].norm()), "mean_grad_norm_vrpo": float(mean["vrpo"].norm()),
        "v_dpo": vd.tolist(), "v_vrpo": vv.tolist(),
        "batch_size": batch_size, "n_minibatches": 2 * n_pairs, "lam": lam, "beta": trainer.beta,
    }
