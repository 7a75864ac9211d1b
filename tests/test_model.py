"""The LSTM decoder: shapes, initial loss, memorising a few captions, padding masking, step()
agreeing with teacher forcing, and the stacked inference step (DecoderStack) equal to step() bitwise."""
import math

import pytest
import torch
from torch import nn

from captioner.api import Captioner
from captioner.config import DecodeConfig, ModelConfig, PreprocessConfig
from captioner.decoding import beam_search, greedy
from captioner.model import CaptionDecoder, DecoderStack, caption_loss
from captioner.vocab import Vocabulary

FEATURE_DIM = 24


def decoder(vocab_size=50, num_layers=1, hidden_dim=32, dropout=0.0, seed=0) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = ModelConfig(feature_dim=FEATURE_DIM, vocab_size=vocab_size, embed_dim=16,
                      hidden_dim=hidden_dim, num_layers=num_layers, dropout=dropout)
    return CaptionDecoder(cfg, pad_id=0)


def random_tokens(batch, length, vocab_size, generator=None) -> torch.Tensor:
    tokens = torch.randint(4, vocab_size, (batch, length), generator=generator)   # (B, T)
    tokens[:, 0] = 1                                                              # <start>
    return tokens


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_shapes(num_layers):
    model = decoder(num_layers=num_layers).eval()
    features = torch.randn(5, FEATURE_DIM)                    # (B, D)
    h0, c0 = model.init_state(features)
    assert h0.shape == c0.shape == (num_layers, 5, 32)
    assert model(features, random_tokens(5, 7, 50)).shape == (5, 7, 50)
    h, c = model.start_state(features)                        # batch-first for decoding
    assert h.shape == c.shape == (5, num_layers, 32)
    logprobs, (h1, c1) = model.step(torch.full((5,), 1), (h, c))
    assert logprobs.shape == (5, 50) and h1.shape == c1.shape == (5, num_layers, 32)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(5), atol=1e-5)


def test_vocab_size_must_be_set():
    with pytest.raises(ValueError, match="vocab_size"):
        CaptionDecoder(ModelConfig(vocab_size=0))


@pytest.mark.parametrize("vocab_size", [50, 1000])
def test_initial_loss_is_log_vocab_size(vocab_size):
    model = decoder(vocab_size=vocab_size, dropout=0.5).train()
    tokens = random_tokens(16, 12, vocab_size)
    loss = caption_loss(model(torch.randn(16, FEATURE_DIM), tokens), tokens, pad_id=0).item()
    assert abs(loss - math.log(vocab_size)) < 0.1 * math.log(vocab_size), loss


CAPTIONS = ["a dog runs on the grass", "two cats sleep", "a man rides a red bike",
            "children play in the snow near a house"]


def memorised():
    """A decoder that learnt four (feature, caption) pairs by heart."""
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    model = decoder(vocab_size=len(vocab), hidden_dim=64)
    features = torch.randn(len(CAPTIONS), FEATURE_DIM, generator=torch.Generator().manual_seed(1))
    tokens = nn.utils.rnn.pad_sequence([torch.tensor(vocab.encode(c)) for c in CAPTIONS],
                                       batch_first=True, padding_value=vocab.pad_id)   # (4, T)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = caption_loss(model(features, tokens), tokens, vocab.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return vocab, model.eval(), features, losses


def test_overfit_a_few_pairs_and_decode_them_back():
    vocab, model, features, losses = memorised()
    assert losses[0] > 2.0 and losses[-1] < 0.05, (losses[0], losses[-1])
    with torch.inference_mode():
        hyps = greedy(model.step, model.start_state(features), vocab.bos_id, vocab.eos_id, max_len=20)
        assert [vocab.decode(h.tokens) for h in hyps] == CAPTIONS
        beams = beam_search(model.step, model.start_state(features), vocab.bos_id, vocab.eos_id,
                            max_len=20, beam_size=3)
        assert [vocab.decode(b[0].tokens) for b in beams] == CAPTIONS
    # the same through the public API (features in, Caption objects out)
    captioner = Captioner(nn.Identity(), [model], vocab, model.cfg, PreprocessConfig())
    captions = captioner.caption_features(features, DecodeConfig(method="greedy"))
    assert [c.text for c in captions] == CAPTIONS
    assert all(c.words == c.text.split() and min(c.word_probs) > 0.5 for c in captions)


def test_loss_ignores_padding():
    model = decoder().eval()
    features = torch.randn(3, FEATURE_DIM)
    tokens = random_tokens(3, 6, 50)
    tokens[0, 4:] = 0                                           # first caption is shorter
    loss = caption_loss(model(features, tokens), tokens, pad_id=0)
    padded = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)   # (3, 11)
    assert torch.allclose(caption_loss(model(features, padded), padded, pad_id=0), loss, atol=1e-6)
    # logits at padded positions do not matter
    logits = model(features, padded)
    logits[0, 3:] = torch.randn_like(logits[0, 3:]) * 100       # position t predicts token t + 1
    logits[1:, 6:] = 1000.0
    assert torch.allclose(caption_loss(logits, padded, pad_id=0), loss, atol=1e-6)


def test_loss_is_the_mean_over_real_tokens():
    model = decoder().eval()
    features = torch.randn(2, FEATURE_DIM)
    tokens = random_tokens(2, 5, 50)
    tokens[1, 2:] = 0                                          # 1 real target vs 4
    logits = model(features, tokens)
    logprobs = logits.log_softmax(-1)
    per_token = [-logprobs[0, t, tokens[0, t + 1]] for t in range(4)] + [-logprobs[1, 0, tokens[1, 1]]]
    assert torch.allclose(caption_loss(logits, tokens, pad_id=0), torch.stack(per_token).mean(),
                          atol=1e-6)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_step_agrees_with_teacher_forcing(num_layers):
    model = decoder(num_layers=num_layers, dropout=0.3).eval()   # eval: dropout off
    features = torch.randn(4, FEATURE_DIM)
    tokens = random_tokens(4, 8, 50)
    with torch.no_grad():
        forced = model(features, tokens).log_softmax(-1)          # (4, 8, V)
        state = model.start_state(features)
        for t in range(tokens.shape[1]):
            logprobs, state = model.step(tokens[:, t], state)
            assert torch.allclose(logprobs, forced[:, t], atol=1e-5), f"position {t}"


def test_dropout_is_active_in_training_only():
    model = decoder(dropout=0.5)
    features, tokens = torch.randn(2, FEATURE_DIM), random_tokens(2, 5, 50)
    torch.manual_seed(0)
    train_a, train_b = model.train()(features, tokens), model(features, tokens)
    assert not torch.allclose(train_a, train_b)
    model.eval()
    assert torch.equal(model(features, tokens), model(features, tokens))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_packed_training_loss_and_gradients_equal_the_padded_ones(num_layers):
    """forward(packed=True) skips padding in the LSTM and the readout: same loss, same gradients."""
    model = decoder(num_layers=num_layers).eval()
    features = torch.randn(4, FEATURE_DIM)
    tokens = random_tokens(4, 9, 50)
    tokens[0, 5:] = 0
    tokens[2, 3:] = 0
    tokens[3, 8:] = 0
    losses, grads = [], []
    for packed in (False, True):
        model.zero_grad()
        loss = caption_loss(model(features, tokens, packed=packed), tokens, pad_id=0, label_smoothing=0.1)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model(features, tokens, packed=True).shape == (int((tokens[:, 1:] != 0).sum()), 50)
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_tied_decoder_starts_at_log_vocab_size():
    """A tied readout uses the embedding matrix: it must start small, or the loss starts near 12."""
    torch.manual_seed(0)
    cfg = ModelConfig(feature_dim=FEATURE_DIM, vocab_size=2000, embed_dim=64, hidden_dim=64, tie_embeddings=True)
    model = CaptionDecoder(cfg, pad_id=0).eval()
    tokens = random_tokens(16, 12, 2000)
    loss = caption_loss(model(torch.randn(16, FEATURE_DIM), tokens), tokens, pad_id=0)
    assert abs(loss.item() - math.log(2000)) < 0.5
    assert model.embed.weight[0].abs().sum() == 0                   # <pad> row stays zero


def member_states(members, features) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' start states in DecoderStack's layout: (h, c), each (N, M, L, H)."""
    starts = [m.start_state(features) for m in members]
    return tuple(torch.stack([start[i] for start in starts], 1) for i in range(2))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_decoder_stack_equals_each_members_step_bitwise(num_layers):
    """The stacked step decoding runs (precomputed word gates, batched products over members)
    gives every member exactly what CaptionDecoder.step gives, step after step, alone or in an
    ensemble, in any number of rows >= 8 (api.MIN_DECODE_ROWS)."""
    members = [decoder(vocab_size=300, num_layers=num_layers, hidden_dim=64, seed=s).eval() for s in range(3)]
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for count in (1, 3):
            stack = DecoderStack(members[:count])
            for rows in (8, 13, 40):
                state = member_states(members[:count], torch.randn(rows, FEATURE_DIM, generator=generator))
                tokens = torch.randint(0, 300, (rows,), generator=generator)
                for _ in range(3):
                    logprobs, new_state = stack.step(tokens, state)             # (M, N, V)
                    for m, member in enumerate(members[:count]):
                        expected, (h, c) = member.step(tokens, (state[0][:, m], state[1][:, m]))
                        assert torch.equal(logprobs[m], expected), (count, rows, m)
                        assert torch.equal(new_state[0][:, m], h) and torch.equal(new_state[1][:, m], c)
                    state, tokens = new_state, logprobs[-1].argmax(-1)


def test_ensemble_step_and_the_stack_follow_the_weights():
    """Captioner.step averages the members' probabilities (banned words renormalised away), from
    the members' own steps bitwise; after the weights change, decoding uses the new ones."""
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    members = [decoder(vocab_size=len(vocab), hidden_dim=64, seed=s).eval() for s in range(2)]
    captioner = Captioner(nn.Identity(), members, vocab, members[0].cfg, PreprocessConfig())
    features = torch.randn(3, FEATURE_DIM, generator=torch.Generator().manual_seed(2))
    tokens = torch.tensor([vocab.bos_id, 5, 6])
    banned = torch.tensor([vocab.pad_id, vocab.bos_id, vocab.unk_id])

    def expected_step():
        padded = torch.cat([features, features.new_zeros(5, FEATURE_DIM)])        # 8 rows, as the api pads
        rows = torch.cat([tokens, tokens.new_zeros(5)])
        each = torch.stack([m.step(rows, m.start_state(padded))[0] for m in members])   # (M, 8, V)
        return torch.log_softmax(torch.logsumexp(each, 0).index_fill(1, banned, float("-inf")), -1)[:3]

    with torch.inference_mode():
        logprobs, (h, c) = captioner.step(tokens, captioner.start_state(features))
        assert h.shape == c.shape == (3, 2, 1, 64)                                # (N, M, L, H)
        assert torch.equal(logprobs, expected_step())
        assert torch.all(logprobs[:, banned] == float("-inf"))
        with torch.no_grad():
            members[1].readout.bias[7] += 5.0                                     # in place: same tensor
        assert torch.equal(captioner.step(tokens, captioner.start_state(features))[0], expected_step())
