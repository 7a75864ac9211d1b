"""Caption decoding: greedy search, sampling and beam search over an abstract step function.

Nothing here knows about the model. A decoder is seen only through

    step(tokens, state) -> (logprobs, new_state)

where ``tokens`` is a LongTensor (N,) holding the previous token of every row, ``state`` is a
tuple of tensors with the row (batch) dimension first, and ``logprobs`` is a log-softmaxed
FloatTensor (N, V) over the next token. Because every state tensor is batched along dim 0,
this module can duplicate rows (for samples or beams) and reorder them (when beams are
re-ranked) with ``repeat_interleave`` / ``index_select`` without knowing what they hold.

Running under ``torch.inference_mode()`` is the caller's job; nothing here needs gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

State = tuple[torch.Tensor, ...]  # every tensor has the batch dimension first (dim 0)
StepFn = Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]

__all__ = ["State", "StepFn", "Hypothesis", "greedy", "sample", "beam_search", "length_normalised",
           "repeated_ngram_bans"]


@dataclass
class Hypothesis:
    """One decoded sequence.

    tokens: generated ids, without bos and without the final eos.
    logprob: sum of the model's log-probs of all generated tokens, including the eos if emitted.
    score: ranking score (``logprob`` after length normalisation; equal to ``logprob`` for
        greedy and sampling).
    token_logprobs: model log-prob of each token in ``tokens`` (e.g. per-word confidence in a UI).
    """

    tokens: list[int]
    logprob: float
    score: float
    token_logprobs: list[float]


def length_normalised(logprob: float, length: int, alpha: float) -> float:
    """``logprob / length**alpha``; ``length`` counts the eos if one was emitted. alpha=0 -> logprob."""
    if alpha == 0 or length == 0:
        return logprob
    return logprob / length**alpha


def repeated_ngram_bans(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in ``history`` ("a horse on a horse": with
    n=2, after "... a" the token "horse" is banned). n=0 bans nothing."""
    if n <= 0 or len(history) < n - 1:
        return []
    suffix = history[len(history) - n + 1:] if n > 1 else []
    return [history[i + n - 1] for i in range(len(history) - n + 1) if history[i:i + n - 1] == suffix]


def _block_repeats(logprobs: torch.Tensor, histories: list[list[int]], n: int) -> torch.Tensor:
    """logprobs (N, V) with -inf where a token would repeat an n-gram of its row's history.
    Blocking steers the search only: the log-probs a Hypothesis reports stay the model's."""
    if n <= 0:
        return logprobs
    rows = [(r, t) for r, h in enumerate(histories) for t in repeated_ngram_bans(h, n)]
    if not rows:
        return logprobs
    index = torch.tensor(rows, device=logprobs.device).T                         # (2, bans)
    return logprobs.index_put((index[0], index[1]),
                              torch.tensor(-math.inf, device=logprobs.device, dtype=logprobs.dtype))


def _expand(state: State, n: int) -> State:
    """Repeat every row n times, keeping copies of the same row adjacent (item-major order)."""
    return tuple(s.repeat_interleave(n, dim=0) for s in state)


def _rollout(step: StepFn, state: State, bos_id: int, eos_id: int, max_len: int,
             pick: Callable[[torch.Tensor], torch.Tensor], no_repeat_ngram_size: int = 0) -> list[Hypothesis]:
    """Decode every row of ``state`` left to right, choosing each token with ``pick``.

    ``pick`` maps logprobs (N, V) to tokens (N,), after tokens that would repeat an n-gram of
    size ``no_repeat_ngram_size`` (0 = off) are masked. Returns one Hypothesis per row.
    """
    n = state[0].shape[0]
    device = state[0].device
    tokens = torch.full((n,), bos_id, dtype=torch.long, device=device)  # (N,)
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # (N,)
    chosen, chosen_lp = [], []
    histories: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_len):
        logprobs, state = step(tokens, state)  # (N, V)
        # The model runs batched, so finished rows are still fed (eos); what they produce is dropped.
        tokens = pick(_block_repeats(logprobs, histories, no_repeat_ngram_size)).masked_fill(finished, eos_id)  # (N,)
        if no_repeat_ngram_size:
            for h, t in zip(histories, tokens.tolist()):
                h.append(t)
        chosen.append(tokens)
        chosen_lp.append(logprobs.gather(1, tokens[:, None]).squeeze(1))  # (N,)
        finished = finished | (tokens == eos_id)
        if bool(finished.all()):
            break
    if not chosen:  # max_len == 0
        return [Hypothesis([], 0.0, 0.0, []) for _ in range(n)]
    hyps = []
    for toks, lps in zip(torch.stack(chosen, 1).tolist(), torch.stack(chosen_lp, 1).tolist()):  # (N, T)
        length = toks.index(eos_id) if eos_id in toks else len(toks)
        # Sequential Python sum in float64, the same order beam search accumulates in.
        logprob = sum(lps[: length + 1], 0.0)  # includes the eos log-prob when there is one
        hyps.append(Hypothesis(toks[:length], logprob, logprob, lps[:length]))
    return hyps


def greedy(step: StepFn, state: State, bos_id: int, eos_id: int, max_len: int = 20,
           no_repeat_ngram_size: int = 0) -> list[Hypothesis]:
    """Pick the most likely token at every step (never one that repeats an n-gram of size
    ``no_repeat_ngram_size``, when > 0). Returns one Hypothesis per batch item."""
    return _rollout(step, state, bos_id, eos_id, max_len, lambda logprobs: logprobs.argmax(-1),
                    no_repeat_ngram_size)


def sample(step: StepFn, state: State, bos_id: int, eos_id: int, max_len: int = 20,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None, num_samples: int = 1,
           no_repeat_ngram_size: int = 0) -> list[list[Hypothesis]]:
    """Draw ``num_samples`` sequences per batch item (ancestral sampling).

    The model's distribution is divided by ``temperature`` (in log space), then restricted to the
    ``top_k`` most likely tokens (0 = no limit) and to the nucleus: the smallest set of most likely
    tokens whose probability reaches ``top_p`` (the top token is always kept). ``top_k=1`` is greedy.
    Returned log-probs and scores are those of the untempered model, so they compare across methods.
    Pass a seeded ``generator`` (on the model's device) for reproducible draws.
    """
    if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1 or num_samples < 1:
        raise ValueError("need temperature > 0, top_k >= 0, 0 < top_p <= 1, num_samples >= 1")

    def pick(logprobs: torch.Tensor) -> torch.Tensor:
        # A stable descending sort puts the first maximal index at rank 0, the same token argmax
        # returns, so top_k=1 and a tiny top_p reproduce greedy exactly even on ties.
        sorted_lp, order = torch.sort(logprobs.float() / temperature, dim=-1, descending=True, stable=True)  # (N, V)
        probs = sorted_lp.softmax(-1)  # (N, V), tempered, sorted
        keep = torch.ones_like(probs, dtype=torch.bool)  # (N, V)
        if top_k > 0:
            keep[:, top_k:] = False
        if top_p < 1:  # skipped at 1 so float rounding of the cumsum never drops tail tokens
            # Mass of the strictly more likely tokens < p: the smallest set reaching p; rank 0 (mass 0) stays.
            keep &= probs.cumsum(-1) - probs < top_p
        choice = torch.multinomial(probs.masked_fill(~keep, 0.0), 1, generator=generator)  # (N, 1), sorted rank
        return order.gather(1, choice).squeeze(1)  # (N,)

    batch = state[0].shape[0]
    hyps = _rollout(step, _expand(state, num_samples), bos_id, eos_id, max_len, pick, no_repeat_ngram_size)
    return [hyps[i * num_samples:(i + 1) * num_samples] for i in range(batch)]


def beam_search(step: StepFn, state: State, bos_id: int, eos_id: int, max_len: int = 20,
                beam_size: int = 3, length_penalty: float = 0.0, n_best: int = 1,
                no_repeat_ngram_size: int = 0) -> list[list[Hypothesis]]:
    """Beam search with a pool of finished hypotheses. Returns ``n_best`` hypotheses per item, best first.

    Each item keeps ``beam_size`` live (eos-free) beams; the state is expanded to B*K rows and
    ``step`` is called once per time step for all of them. Hypotheses that emit eos go to the item's
    pool, ranked by ``length_normalised(logprob, length, length_penalty)``; beams still live at
    ``max_len`` join the pool unterminated. An item stops as soon as no live beam can beat the
    ``n_best``-th hypothesis of its pool. ``beam_size=1`` reproduces greedy (with length_penalty 0);
    a beam of at least V**max_len is exhaustive search. ``no_repeat_ngram_size`` > 0 never extends
    a beam with a token that repeats one of its n-grams (scores stay the model's log-probs).
    """
    if not 1 <= n_best <= beam_size or length_penalty < 0:
        raise ValueError("need 1 <= n_best <= beam_size and length_penalty >= 0")
    B, K, alpha = state[0].shape[0], beam_size, length_penalty
    device = state[0].device
    state = _expand(state, K)  # rows b*K .. b*K+K-1 belong to item b
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=device)  # (B*K,)
    # Only beam 0 starts live: K copies of the bos beam would fill the beam with duplicates.
    # Dead beams carry -inf, so every candidate extending them is skipped.
    live_lp = [0.0 if k == 0 else -math.inf for _ in range(B) for k in range(K)]  # (B*K,)
    hist: list[list[int]] = [[] for _ in range(B * K)]  # tokens of each live beam
    hist_lp: list[list[float]] = [[] for _ in range(B * K)]  # their log-probs
    pools: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    # Upper bound on the score any continuation can reach: its logprob only decreases and
    # (alpha >= 0) its length is at most max_len, so score <= live logprob / max_len**alpha.
    bound_div = max_len**alpha

    for _ in range(max_len):
        logprobs, state = step(tokens, state)  # (B*K, V)
        V = logprobs.shape[1]
        prev = torch.tensor(live_lp, dtype=torch.float64, device=device)  # (B*K,)
        allowed = _block_repeats(logprobs, hist, no_repeat_ngram_size)  # (B*K, V)
        cand = (prev[:, None] + allowed.double()).reshape(B, K * V)  # (B, K*V)
        # At most one eos per beam, so the top 2K always hold K live candidates if K are possible.
        top_lp, top_idx = cand.topk(min(2 * K, K * V), dim=1)  # (B, 2K)
        top_tok_lp = logprobs.reshape(B, K * V).gather(1, top_idx)  # (B, 2K)
        top_lp, top_idx, top_tok_lp = top_lp.tolist(), top_idx.tolist(), top_tok_lp.tolist()

        parents = list(range(B * K))
        new_tok, new_lp = [eos_id] * (B * K), [-math.inf] * (B * K)
        new_hist, new_hist_lp = [[] for _ in range(B * K)], [[] for _ in range(B * K)]
        for b in range(B):
            if done[b]:
                continue  # its rows stay dead (-inf) and are just carried along
            n_live = 0
            for lp, idx, tok_lp in zip(top_lp[b], top_idx[b], top_tok_lp[b]):
                if lp == -math.inf or n_live == K:
                    break  # candidates are sorted: the rest are impossible or not needed
                row, tok = b * K + idx // V, idx % V
                if tok == eos_id:
                    length = len(hist[row]) + 1
                    pools[b].append(Hypothesis(hist[row], lp, length_normalised(lp, length, alpha), hist_lp[row]))
                    continue
                dst = b * K + n_live  # live beams are stored best first
                parents[dst], new_tok[dst], new_lp[dst] = row, tok, lp
                new_hist[dst], new_hist_lp[dst] = hist[row] + [tok], hist_lp[row] + [tok_lp]
                n_live += 1
            pools[b] = sorted(pools[b], key=lambda h: h.score, reverse=True)[:n_best]
            full = len(pools[b]) == n_best
            done[b] = n_live == 0 or (full and new_lp[b * K] / bound_div <= pools[b][-1].score)

        state = tuple(s.index_select(0, torch.tensor(parents, device=device)) for s in state)  # (B*K, ...)
        tokens = torch.tensor(new_tok, dtype=torch.long, device=device)  # (B*K,)
        live_lp, hist, hist_lp = new_lp, new_hist, new_hist_lp
        if all(done):
            break

    for b in range(B):  # beams that reached max_len without eos end there
        if not done[b]:
            for row in range(b * K, (b + 1) * K):
                if live_lp[row] > -math.inf:
                    score = length_normalised(live_lp[row], len(hist[row]), alpha)
                    pools[b].append(Hypothesis(hist[row], live_lp[row], score, hist_lp[row]))
            pools[b] = sorted(pools[b], key=lambda h: h.score, reverse=True)[:n_best]
    return pools
