"""Tests for captioner.decoding against fake step functions built from probability tables.

No model and no data: a "model" is a table of next-token probabilities.
"""
import math

import pytest
import torch

from captioner.decoding import (Hypothesis, beam_search, greedy, length_normalised,
                                repeated_ngram_bans, sample)

BOS, EOS, A, B, C = 0, 1, 2, 3, 4
V = 5
ln = math.log

# Hand-written bigram model: row = previous token, column = next token.
# Greedy follows a (.4) -> c (.4) -> eos (.9) = .144, but "b eos" (.35 * .5 = .175) and
# "c eos" (.25 * .9 = .225) are better; beam 2 drops c after step 1, beam 3 keeps it.
TABLE = torch.tensor([
    # bos  eos   a     b     c
    [0.0, 0.0, 0.40, 0.35, 0.25],  # after bos (eos impossible: no empty captions)
    [0.0, 1.0, 0.0, 0.0, 0.0],     # after eos (only fed to finished rows)
    [0.0, 0.2, 0.10, 0.30, 0.40],  # after a
    [0.0, 0.5, 0.25, 0.15, 0.10],  # after b
    [0.0, 0.9, 0.05, 0.03, 0.02],  # after c
])


def table_step(table, calls=None):
    """Bigram step: next-token distribution depends only on the fed token; the state is inert."""
    logt = table.log()

    def step(tokens, state):
        if calls is not None:
            calls.append(tokens.clone())
        return logt[tokens], state

    return step


def inert_state(n):
    return (torch.zeros(n, 1),)


def random_model(seed, items=3, zero_frac=0.2, sharpen=3.0):
    """Random trigram-ish model: P(next | item, previous token, fed token).

    The state (item id, previous token) is per row, so a beam that reorders state wrongly or
    mixes items shows up as wrong log-probs. Some entries are exactly 0 (log -inf).
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(items, V, V, V, generator=g) ** sharpen
    p[torch.rand(items, V, V, V, generator=g) < zero_frac] = 0.0
    p[..., EOS] += 0.05  # every row can end
    logp = (p / p.sum(-1, keepdim=True)).log()

    def step(tokens, state):
        item, prev = state
        return logp[item, prev, tokens], (item, tokens)

    state = (torch.arange(items), torch.full((items,), BOS))
    return step, state


def row(state, i):
    return tuple(s[i:i + 1] for s in state)


def brute_force(step, state, max_len, alpha):
    """All sequences of one item (state has 1 row), best score first: (tokens, logprob, score)."""
    out = []

    def rec(prefix, logprob, tok, st):
        if len(prefix) == max_len:  # ran out of length without eos
            out.append((prefix, logprob, length_normalised(logprob, len(prefix), alpha)))
            return
        lps, st = step(torch.tensor([tok]), st)
        for v, lp in enumerate(lps[0].tolist()):
            if lp == -math.inf:
                continue
            if v == EOS:
                out.append((prefix, logprob + lp, length_normalised(logprob + lp, len(prefix) + 1, alpha)))
            else:
                rec(prefix + [v], logprob + lp, v, st)

    rec([], 0.0, BOS, state)
    return sorted(out, key=lambda x: x[2], reverse=True)


def rescore(step, state, h, max_len):
    """Replay a hypothesis through the model: (token log-probs, total incl. eos if emitted)."""
    tok, lps, total = BOS, [], 0.0
    for t in h.tokens + ([EOS] if len(h.tokens) < max_len else []):
        out, state = step(torch.tensor([tok]), state)
        lps.append(out[0, t].item())
        total += lps[-1]
        tok = t
    return lps[:len(h.tokens)], total


def assert_hyp(h, tokens, logprob, score=None):
    assert h.tokens == tokens
    assert h.logprob == pytest.approx(logprob, abs=1e-5)
    assert h.score == pytest.approx(logprob if score is None else score, abs=1e-5)
    assert len(h.token_logprobs) == len(h.tokens)


# ---------------------------------------------------------------- hand-computed expectations

def test_impossible_sequences_are_never_returned():
    det = torch.zeros(V, V)
    det[BOS, A] = det[A, EOS] = det[EOS, EOS] = det[B, EOS] = det[C, EOS] = 1.0  # only "a" is possible
    (hyps,) = beam_search(table_step(det), inert_state(1), BOS, EOS, beam_size=3, n_best=3)
    assert len(hyps) == 1
    assert_hyp(hyps[0], [A], 0.0)


def test_ties_break_like_argmax():
    tied = TABLE.clone()
    tied[BOS] = torch.tensor([0.0, 0.0, 0.3, 0.4, 0.4])  # b and c tie: argmax takes the first, b
    step, st = table_step(tied), inert_state(1)
    (g,) = greedy(step, st, BOS, EOS)
    assert g.tokens == [B]
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert all(h == g for h in draw(step, st, 0, num_samples=20, **kw)[0])


def test_length_normalised():
    assert length_normalised(-3.0, 3, 0.0) == -3.0
    assert length_normalised(-3.0, 3, 1.0) == pytest.approx(-1.0)
    assert length_normalised(-4.0, 4, 0.5) == pytest.approx(-2.0)


def test_greedy_hand_table():
    (h,) = greedy(table_step(TABLE), inert_state(1), BOS, EOS)
    assert_hyp(h, [A, C], ln(0.4 * 0.4 * 0.9))  # a (.4), c (.4), eos (.9)
    assert h.token_logprobs == pytest.approx([ln(0.4), ln(0.4)])


def test_beam_hand_table():
    step, st = table_step(TABLE), inert_state(1)
    # beam 1: same path as greedy.
    (b1,), = beam_search(step, st, BOS, EOS, beam_size=1)
    assert_hyp(b1, [A, C], ln(0.144))
    # beam 2: step 1 keeps a (.4), b (.35); step 2: "b eos" = .175 beats the best live a-c = .16.
    (b2,), = beam_search(step, st, BOS, EOS, beam_size=2)
    assert_hyp(b2, [B], ln(0.35 * 0.5))
    assert b2.token_logprobs == pytest.approx([ln(0.35)])
    # beam 3 also keeps c (.25): "c eos" = .225.
    (b3,), = beam_search(step, st, BOS, EOS, beam_size=3)
    assert_hyp(b3, [C], ln(0.25 * 0.9))
    # n_best 3: c .225, b .175, then a c .144 found at step 3 (best live then is b a c = .035).
    top3 = beam_search(step, st, BOS, EOS, beam_size=3, n_best=3)[0]
    for h, (toks, p) in zip(top3, [([C], 0.225), ([B], 0.175), ([A, C], 0.144)]):
        assert_hyp(h, toks, ln(p))
    assert len(top3) == 3


def test_beam_keeps_k_live_beams_when_eos_ranks_high():
    # Beam 2, step 2: "b eos" (.175) ranks first and goes to the pool; the beam must still be
    # refilled with the next two live candidates, a c (.16) and a b (.12), not just one.
    calls = []
    top2 = beam_search(table_step(TABLE, calls), inert_state(1), BOS, EOS, beam_size=2, n_best=2)[0]
    assert calls[2].tolist() == [C, B]
    # Step 3: a c eos (.144) and a b eos (.06) finish; .144 beats the best live a b a (.03).
    assert [h.tokens for h in top2] == [[B], [A, C]]
    assert [h.logprob for h in top2] == pytest.approx([ln(0.175), ln(0.144)])


def test_beam_length_penalty_hand_table():
    # alpha=1 divides by length incl. eos: c -> ln(.225)/2 = -0.746, a c -> ln(.144)/3 = -0.646.
    (h,), = beam_search(table_step(TABLE), inert_state(1), BOS, EOS, max_len=3, beam_size=3, length_penalty=1.0)
    assert_hyp(h, [A, C], ln(0.144), ln(0.144) / 3)


def test_max_len_cuts_without_eos():
    step, st = table_step(TABLE), inert_state(1)
    (h,) = greedy(step, st, BOS, EOS, max_len=2)
    assert_hyp(h, [A, C], ln(0.4 * 0.4))  # no eos emitted, so none counted
    (h,) = greedy(step, st, BOS, EOS, max_len=1)
    assert_hyp(h, [A], ln(0.4))
    (h,), = beam_search(step, st, BOS, EOS, max_len=1, beam_size=2)
    assert_hyp(h, [A], ln(0.4))
    (h,) = greedy(step, st, BOS, EOS, max_len=0)
    assert_hyp(h, [], 0.0)


def test_stops_when_all_rows_finished():
    calls = []
    greedy(table_step(TABLE, calls), inert_state(2), BOS, EOS, max_len=20)
    assert len(calls) == 3  # a, c, eos: no step after every row has ended
    calls.clear()
    beam_search(table_step(TABLE, calls), inert_state(2), BOS, EOS, max_len=20, beam_size=2)
    assert [c.shape for c in calls] == [(4,), (4,)]  # one call per time step over all B*K rows


def test_finished_rows_are_fed_eos_and_do_not_grow():
    step, st = random_model(0, items=6, sharpen=1.0)
    fed = []

    def recording(tokens, state):
        fed.append(tokens.clone())
        return step(tokens, state)

    max_len = 6
    hyps = [h for hs in sample(recording, st, BOS, EOS, max_len, generator=torch.Generator().manual_seed(1),
                               num_samples=4) for h in hs]
    fed = torch.stack(fed, 1)  # (N, T): token fed at each step
    for r, h in enumerate(hyps):
        assert EOS not in h.tokens and len(h.tokens) <= max_len
        if len(h.tokens) < max_len:  # ended with eos: from then on it is only fed eos
            assert (fed[r, len(h.tokens) + 1:] == EOS).all()
    assert any(len(h.tokens) < max_len - 1 for h in hyps)


# ---------------------------------------------------------------- exhaustive search on random models

@pytest.mark.parametrize("alpha", [0.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_brute_force(seed, alpha):
    max_len = 4
    step, st = random_model(seed)
    beams = beam_search(step, st, BOS, EOS, max_len, beam_size=V**max_len, length_penalty=alpha, n_best=3)
    for i, hyps in enumerate(beams):
        expected = brute_force(step, row(st, i), max_len, alpha)[:3]
        assert [h.tokens for h in hyps] == [e[0] for e in expected]
        assert [h.logprob for h in hyps] == pytest.approx([e[1] for e in expected])
        assert [h.score for h in hyps] == pytest.approx([e[2] for e in expected])
        for h in hyps:
            lps, total = rescore(step, row(st, i), h, max_len)
            assert h.token_logprobs == pytest.approx(lps) and h.logprob == pytest.approx(total)


@pytest.mark.parametrize("seed", range(5))
def test_beam_1_equals_greedy(seed):
    step, st = random_model(seed, items=4)
    g = greedy(step, st, BOS, EOS, max_len=8)
    b = beam_search(step, st, BOS, EOS, max_len=8, beam_size=1)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert [h.logprob for h in g] == pytest.approx([hs[0].logprob for hs in b])
    for i, h in enumerate(g):
        lps, total = rescore(step, row(st, i), h, 8)
        assert h.token_logprobs == pytest.approx(lps) and h.logprob == pytest.approx(total)


def test_batch_equals_one_by_one():
    step, st = random_model(7, items=4)
    batch_g = greedy(step, st, BOS, EOS, max_len=6)
    batch_b = beam_search(step, st, BOS, EOS, max_len=6, beam_size=3, length_penalty=0.5, n_best=2)
    for i in range(4):
        assert greedy(step, row(st, i), BOS, EOS, max_len=6) == [batch_g[i]]
        alone = beam_search(step, row(st, i), BOS, EOS, max_len=6, beam_size=3, length_penalty=0.5, n_best=2)
        assert alone == [batch_b[i]]
    assert len({tuple(h.tokens) for h in batch_g}) > 1  # items really differ


# ---------------------------------------------------------------- sampling

def draw(step, st, seed, **kw):
    return sample(step, st, BOS, EOS, generator=torch.Generator().manual_seed(seed), **kw)


def test_sample_seeded_repeats_and_seeds_differ():
    step, st = random_model(3, zero_frac=0.0, sharpen=1.0)  # spread-out probabilities
    first = draw(step, st, 0, max_len=6, num_samples=5)
    assert draw(step, st, 0, max_len=6, num_samples=5) == first
    assert draw(step, st, 1, max_len=6, num_samples=5) != first
    assert len(first) == 3 and all(len(hs) == 5 for hs in first)
    for i, hs in enumerate(first):  # log-probs are the model's and consistent with the tokens
        for h in hs:
            lps, total = rescore(step, row(st, i), h, 6)
            assert h.token_logprobs == pytest.approx(lps) and h.logprob == h.score == pytest.approx(total)


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=1e-3)])
def test_sample_degenerates_to_greedy(kw):
    step, st = table_step(TABLE), inert_state(1)
    g = greedy(step, st, BOS, EOS)
    assert all(h == g[0] for h in draw(step, st, 0, num_samples=50, **kw)[0])
    step, st = random_model(4, items=4)
    if "temperature" not in kw:  # random tables may have near-ties that a finite temperature blurs
        hyps = draw(step, st, 0, max_len=8, num_samples=3, **kw)
        assert [[h] * 3 for h in greedy(step, st, BOS, EOS, max_len=8)] == hyps


def first_token_freqs(n=2000, **kw):
    hs = draw(table_step(TABLE), inert_state(1), 0, max_len=1, num_samples=n, **kw)[0]
    return [sum(h.tokens == [t] for h in hs) / n for t in (A, B, C)], hs


def test_sample_frequencies_match_table():
    freqs, hs = first_token_freqs()
    assert freqs == pytest.approx([0.40, 0.35, 0.25], abs=0.05)
    # top_k=2 and top_p=0.7 (a+b = .75 is the smallest set reaching .7) both drop c and renormalise.
    for kw in (dict(top_k=2), dict(top_p=0.7)):
        assert first_token_freqs(**kw)[0] == pytest.approx([0.4 / 0.75, 0.35 / 0.75, 0.0], abs=0.05)


def test_sample_temperature_flattens_but_reports_model_logprobs():
    freqs, hs = first_token_freqs(temperature=2.0)
    tempered = [p ** 0.5 for p in (0.40, 0.35, 0.25)]
    assert freqs == pytest.approx([p / sum(tempered) for p in tempered], abs=0.05)
    for h in hs[:20]:
        assert h.logprob == pytest.approx(ln(TABLE[BOS, h.tokens[0]].item()))


def test_sample_rejects_bad_arguments():
    for kw in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(num_samples=0)):
        with pytest.raises(ValueError):
            sample(table_step(TABLE), inert_state(1), BOS, EOS, **kw)
    with pytest.raises(ValueError):
        beam_search(table_step(TABLE), inert_state(1), BOS, EOS, beam_size=2, n_best=3)


def test_hypothesis_is_plain_data():
    h = Hypothesis([A], -1.0, -1.0, [-0.5])
    assert h == Hypothesis([A], -1.0, -1.0, [-0.5])


# ---------------------------------------------------------------- blocking repeated n-grams

def test_repeated_ngram_bans():
    # "a horse on a" -> with bigrams blocked, "horse" may not follow "a" again
    a, horse, on = 10, 11, 12
    assert repeated_ngram_bans([a, horse, on, a], 2) == [horse]
    assert repeated_ngram_bans([a, horse, on, a], 3) == []            # "on a" was never followed
    assert repeated_ngram_bans([a, horse, a, horse, on], 3) == []
    assert repeated_ngram_bans([a, horse, a], 3) == []
    assert sorted(repeated_ngram_bans([a, horse, on], 1)) == sorted([a, horse, on])
    assert repeated_ngram_bans([a, horse, on, a], 0) == []
    assert repeated_ngram_bans([a], 2) == []                          # "a" was never followed


def has_repeat(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


# After a: a again (.6) is greedy's choice, so unblocked greedy writes "a a a ...".
LOOP_TABLE = torch.tensor([
    # bos  eos   a     b     c
    [0.0, 0.0, 0.70, 0.20, 0.10],  # after bos
    [0.0, 1.0, 0.0, 0.0, 0.0],     # after eos
    [0.0, 0.1, 0.60, 0.20, 0.10],  # after a
    [0.0, 0.3, 0.40, 0.20, 0.10],  # after b
    [0.0, 0.9, 0.05, 0.03, 0.02],  # after c
])


def test_greedy_blocking_hand_table():
    step = table_step(LOOP_TABLE)
    assert greedy(step, inert_state(1), BOS, EOS, max_len=4)[0].tokens == [A, A, A, A]
    h = greedy(step, inert_state(1), BOS, EOS, max_len=6, no_repeat_ngram_size=2)[0]
    # a a (bigram "a a" now used) -> after a: a banned, b (.2) -> after b: a (.4) -> "b a" used,
    # after a: a banned ("a a"), b banned ("a b"); eos and c tie at .1, eos first (like argmax)
    assert h.tokens == [A, A, B, A]
    # The reported log-probs stay the model's (not renormalised over the allowed tokens).
    assert h.logprob == pytest.approx(ln(.7 * .6 * .2 * .4 * .1), abs=1e-5)


def brute_force_blocked(step, state, max_len, alpha, n):
    return [e for e in brute_force(step, state, max_len, alpha) if not has_repeat(e[0], n)]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("seed", [0, 3])
def test_wide_beam_with_blocking_equals_constrained_brute_force(seed, n):
    max_len = 4
    step, st = random_model(seed)
    beams = beam_search(step, st, BOS, EOS, max_len, beam_size=V**max_len, length_penalty=0.5,
                        n_best=2, no_repeat_ngram_size=n)
    for i, hyps in enumerate(beams):
        expected = brute_force_blocked(step, row(st, i), max_len, 0.5, n)[:2]
        assert [h.tokens for h in hyps] == [e[0] for e in expected]
        assert [h.score for h in hyps] == pytest.approx([e[2] for e in expected])
        for h in hyps:
            lps, total = rescore(step, row(st, i), h, max_len)
            assert h.token_logprobs == pytest.approx(lps) and h.logprob == pytest.approx(total)


@pytest.mark.parametrize("seed", range(3))
def test_blocking_beam_1_equals_blocking_greedy_and_sampling_obeys_it(seed):
    step, st = random_model(seed, items=4)
    g = greedy(step, st, BOS, EOS, max_len=8, no_repeat_ngram_size=2)
    b = beam_search(step, st, BOS, EOS, max_len=8, beam_size=1, no_repeat_ngram_size=2)
    assert [h.tokens for h in g] == [hs[0].tokens for hs in b]
    assert not any(has_repeat(h.tokens, 2) for h in g)
    drawn = draw(step, st, seed, max_len=8, num_samples=5, no_repeat_ngram_size=2)
    assert not any(has_repeat(h.tokens, 2) for hs in drawn for h in hs)
