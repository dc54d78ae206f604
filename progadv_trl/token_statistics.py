"""Tokens -> per-token statistics of the policy and the reference.

Trajectories are batched by length, run through each model's decoder once, and the final hidden states at the scored
positions go through the fused kernel (:mod:`progadv_trl.kernels`): no ``[tokens, vocab]`` tensor is built.
Position ``t`` is scored with the hidden state at ``t - 1`` (the log-prob of ``input_ids[t]`` given what precedes it);
position 0 has no statistic. Unscored positions hold NaN.

The number of forwards depends only on the number of trajectories (``ceil(n / batch_size)`` batches per model, a
batch with nothing to score included), so ranks holding as many trajectories run as many forwards: what sharded
models (FSDP2, ZeRO-3), whose every forward is a collective, need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kernels import POLICY_STATS, token_stats, two_model_token_stats
from .models import ModelView, gather_head
from .rendering import TokenizedTrajectory



@dataclass
class TokenStats:
    """Per-token statistics of one trajectory, each ``[L]`` float32, NaN where not computed.

    ``logprob`` / ``entropy`` / ``self_certainty`` / ``topk_confidence`` are the policy's; ``ref_logprob`` the
    reference's on ``ref_input_ids`` (the same ids unless the models tokenize differently); ``kl`` is the exact
    KL(pi || pi_ref) at each position (only with a shared tokenization).
    """

    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.stats[key]

    def get(self, key: str) -> torch.Tensor | None:
        return self.stats.get(key)


def _scored_positions(tok: TokenizedTrajectory, all_positions: bool) -> torch.Tensor:
    step = torch.tensor(tok.step_index, dtype=torch.long)
    keep = torch.ones_like(step, dtype=torch.bool) if all_positions else step >= 0
    keep[:1] = False
    return keep.nonzero().squeeze(-1)


MIN_SHARED_PREFIX = 32  # tokens; shorter common prefixes are not worth a second decoder call


def _batches(toks: list[TokenizedTrajectory], batch_size: int, share_prefix: bool) -> list[list[int]]:
    """Index batches: by token sequence when sharing prefixes (a group's rows become neighbours), else by length."""
    if share_prefix:
        order = sorted(range(len(toks)), key=lambda i: toks[i].input_ids)
    else:
        order = sorted(range(len(toks)), key=lambda i: len(toks[i].input_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _shared_prefix(rows: list[list[int]]) -> int:
    """Length of the common prefix of ``rows``, leaving every row at least one token of its own."""
    if len(rows) < 2:
        return 0
    limit = min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def _gather_hidden(view: ModelView, toks: list[TokenizedTrajectory], idx: list[int], positions, pad_id: int,
                   share_prefix: bool = False):
    """Hidden states feeding each scored position of the batch ``idx``, stacked: ``[N, H]``, and targets ``[N]``."""
    device = view.device
    width = max(len(toks[i].input_ids) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(toks[i].input_ids)
        ids[row, :n] = torch.tensor(toks[i].input_ids, dtype=torch.long)
        mask[row, :n] = 1
    prefix = _shared_prefix([toks[i].input_ids for i in idx]) if share_prefix else 0
    hidden = view.hidden_states(ids.to(device), mask.to(device), prefix)
    rows = torch.cat([torch.full_like(positions[i], row) for row, i in enumerate(idx)]).to(device)
    cols = torch.cat([positions[i] for i in idx]).to(device)
    return hidden[rows, cols - 1], ids.to(device)[rows, cols]


def _scatter(out: dict[str, torch.Tensor], toks, idx, positions, results: list[dict[str, torch.Tensor]], prefix=""):
    offset = 0
    for i in idx:
        n = positions[i].numel()
        for key, values in out.items():
            full = results[i].setdefault(prefix + key, torch.full((len(toks[i].input_ids),), float("nan")))
            full[positions[i]] = values[offset:offset + n].float().cpu()
        offset += n


def compute_token_stats(policy: ModelView, reference: ModelView, policy_tokens: list[TokenizedTrajectory],
                        reference_tokens: list[TokenizedTrajectory] | None = None, *, temperature: float = 1.0,
                        top_k: int = 20, chunk_size: int | None = None, batch_size: int = 8,
                        all_positions: bool = False, pad_id: int = 0, reference_pad_id: int | None = None,
                        policy_stats: tuple[str, ...] = POLICY_STATS, with_kl: bool = True,
                        share_prefix: bool = True, backend: str = "auto") -> list[TokenStats]:
    """Statistics for a list of tokenized trajectories.

    Args:
        policy, reference: the two distributions.
        policy_tokens: the trajectories as the policy's tokens.
        reference_tokens: the reference's tokens when its tokenizer differs; ``None`` = the same ids (then one fused
            pass computes both models' statistics and the exact per-token KL).
        all_positions: score every position (for ``--details``), not only the steps' tokens.
        policy_stats: the policy statistics to compute (``logprob`` always); ``with_kl``: also the exact KL.
        share_prefix: encode a prefix shared by a batch's rows (a best-of-N group's prompt) once.
        backend: the fused kernel's implementation (``"auto"``, ``"torch"``, ``"triton"``).
    """
    policy_stats = tuple(dict.fromkeys(("logprob", *policy_stats)))
    results: list[dict[str, torch.Tensor]] = [{} for _ in policy_tokens]
    p_head, r_head = gather_head(policy.head), gather_head(reference.head)  # whole weights (collective if sharded)
    p_pos = [_scored_positions(t, all_positions) for t in policy_tokens]
    shared = reference_tokens is None
    for idx in _batches(policy_tokens, batch_size, share_prefix):
        hp, targets = _gather_hidden(policy, policy_tokens, idx, p_pos, pad_id, share_prefix)
        if shared:
            hr, _ = _gather_hidden(reference, policy_tokens, idx, p_pos, pad_id, share_prefix)
        if targets.numel() == 0:  # nothing to score, but the forwards ran (the same count on every rank)
            continue
        if shared:
            out = two_model_token_stats(
                hp, p_head.weight, hr.to(hp.device), r_head.weight.to(hp.device), targets,
                policy_bias=p_head.bias, reference_bias=None if r_head.bias is None else r_head.bias.to(hp.device),
                temperature=temperature, policy_logit_scale=p_head.logit_scale,
                reference_logit_scale=r_head.logit_scale, policy_softcap=p_head.softcap,
                reference_softcap=r_head.softcap, stats=(*policy_stats, "ref_logprob", *(("kl",) if with_kl else ())), top_k=top_k,
                chunk_size=chunk_size, backend=backend)
        else:
            out = token_stats(hp, p_head.weight, targets, bias=p_head.bias, temperature=temperature,
                              logit_scale=p_head.logit_scale, softcap=p_head.softcap, stats=policy_stats,
                              top_k=top_k, chunk_size=chunk_size, backend=backend)
        _scatter(out, policy_tokens, idx, p_pos, results)
    if not shared:
        r_pos = [_scored_positions(t, all_positions) for t in reference_tokens]
        for idx in _batches(reference_tokens, batch_size, share_prefix):
            hr, targets = _gather_hidden(reference, reference_tokens, idx, r_pos,
                                         pad_id if reference_pad_id is None else reference_pad_id, share_prefix)
            if targets.numel() == 0:
                continue
            out = token_stats(hr, r_head.weight, targets, bias=r_head.bias, temperature=temperature,
                              logit_scale=r_head.logit_scale, softcap=r_head.softcap, stats=("logprob",),
                              chunk_size=chunk_size, backend=backend)
            _scatter({"ref_logprob": out["logprob"]}, reference_tokens, idx, r_pos, results)
    for i, res in enumerate(results):  # trajectories with nothing scored still get NaN arrays
        n_ref = len((policy_tokens if shared else reference_tokens)[i].input_ids)
        for key in (*policy_stats, "ref_logprob", *(("kl",) if shared and with_kl else ())):
            if key not in res:
                n = n_ref if key == "ref_logprob" else len(policy_tokens[i].input_ids)
                res[key] = torch.full((n,), float("nan"))
    return [TokenStats(r) for r in results]
