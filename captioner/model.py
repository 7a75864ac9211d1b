"""Show and Tell: CNN features set the initial LSTM state; the LSTM predicts the next word.

    features (B, D) -> [LayerNorm] -> dropout -> Linear -> tanh -> h0, c0  (each (L, B, H))
    <start> w1 .. wn -> Embedding -> LSTM -> dropout -> Linear -> logits over the vocabulary

`step()` is the single-step function the decoding module runs on; it keeps the LSTM state
batch-first, as decoding.py expects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .config import ModelConfig

State = tuple[torch.Tensor, torch.Tensor]


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, pad_id: int = 0):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set from the vocabulary")
        self.cfg, self.pad_id = cfg, pad_id
        self.feature_norm = nn.LayerNorm(cfg.feature_dim) if cfg.feature_norm else nn.Identity()
        self.init_h = nn.Linear(cfg.feature_dim, cfg.num_layers * cfg.hidden_dim)
        self.init_c = nn.Linear(cfg.feature_dim, cfg.num_layers * cfg.hidden_dim)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout)
        self.readout = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            if cfg.embed_dim != cfg.hidden_dim:
                raise ValueError(f"tie_embeddings needs embed_dim == hidden_dim "
                                 f"(got {cfg.embed_dim} and {cfg.hidden_dim})")
            # Shared, the matrix is also the readout: N(0, 1) rows (nn.Embedding's default) would
            # give logits of size sqrt(H) and an initial loss of ~12 instead of log V.
            nn.init.normal_(self.embed.weight, std=cfg.hidden_dim ** -0.5)
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()
            self.readout.weight = self.embed.weight                           # (V, H) shared

    def init_state(self, features: torch.Tensor) -> State:
        """Image features (B, D) -> LSTM state (h0, c0), each (L, B, H)."""
        x = self.dropout(self.feature_norm(features.float()))
        batch, layers, hidden = x.shape[0], self.cfg.num_layers, self.cfg.hidden_dim
        h0 = torch.tanh(self.init_h(x)).view(batch, layers, hidden).transpose(0, 1).contiguous()
        c0 = self.init_c(x).view(batch, layers, hidden).transpose(0, 1).contiguous()
        return h0, c0

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Teacher forcing. tokens (B, T) start with <start>; returns logits (B, T, V) where
        position t predicts tokens[:, t + 1] (the last position is ignored by the loss).

        packed=True (training): only the positions that predict a real word are computed, as
        logits (N, V) in the order of `packed_targets(tokens)`. Captions in a batch differ in
        length, so about half of a padded batch is padding; packing skips it in the LSTM and
        the readout, the two costly layers."""
        if not packed:
            return self.readout(self.dropout(self.hidden_states(features, tokens)))   # (B, T, V)
        state = self.init_state(features)
        inputs = self.dropout(self.embed(tokens))                            # (B, T, E)
        lengths = target_lengths(tokens, self.pad_id)                        # (B,)
        outputs, _ = self.lstm(pack_padded_sequence(inputs, lengths, batch_first=True,
                                                    enforce_sorted=False), state)
        return self.readout(self.dropout(outputs.data))                     # (N, V)

    def hidden_states(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The LSTM's outputs (B, T, H) under teacher forcing (before the readout's dropout)."""
        outputs, _ = self.lstm(self.dropout(self.embed(tokens)), self.init_state(features))
        return outputs                                                       # (B, T, H)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoding step of this decoder alone. tokens (N,), state batch-first (N, L, H) x 2
        -> logprobs (N, V). Decoding runs DecoderStack (below), the inference form of this step;
        this one is its reference, which DecoderStack must equal bitwise (tests/test_model.py,
        benchmarks/bench_decoding.py). The LSTM step is written out as two matrix products per
        layer, the same weights and equations as nn.LSTM (equal to 1e-6)."""
        x = self.embed(tokens)                                               # (N, E)
        h_out, c_out = [], []
        for layer in range(self.cfg.num_layers):
            lstm = self.lstm
            gates = (F.linear(x, getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"bias_ih_l{layer}", None))
                     + F.linear(state[0][:, layer], getattr(lstm, f"weight_hh_l{layer}"),
                                getattr(lstm, f"bias_hh_l{layer}", None)))   # (N, 4H): i, f, g, o
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * state[1][:, layer] + torch.sigmoid(i) * torch.tanh(g)   # (N, H)
            x = torch.sigmoid(o) * torch.tanh(c)                             # (N, H)
            if self.training and layer < self.cfg.num_layers - 1:
                x = F.dropout(x, lstm.dropout, training=True)                # as nn.LSTM between layers
            h_out.append(x)
            c_out.append(c)
        logprobs = F.log_softmax(self.readout(x).float(), dim=-1)            # (N, V)
        return logprobs, (torch.stack(h_out, 1), torch.stack(c_out, 1))       # (N, L, H) x 2

    def start_state(self, features: torch.Tensor) -> State:
        """init_state in the batch-first layout decoding.py uses: (B, L, H) x 2."""
        h0, c0 = self.init_state(features)
        return h0.transpose(0, 1), c0.transpose(0, 1)


class DecoderStack:
    """Several decoders' (an ensemble's) eval-mode step as one computation over stacked weights:
    the inference form of CaptionDecoder.step for decoding, equal to it bitwise (tested).

    Per step and member it reads fewer weights and makes fewer calls than CaptionDecoder.step:
    - the first layer's input gates W_ih e(w) + b_ih depend on the word alone, so they are
      computed once for the whole vocabulary (word_gates, (M, V, 4H)) and gathered per step: one
      of the three matrix products a step used to do (W_ih, W_hh, readout) is gone;
    - the members' W_hh and readout weights are stacked, so one batched product (baddbmm) serves
      every member, and the LSTM cell's and log-softmax's elementwise ops run once for all.
    A snapshot of the weights: Captioner.decoder_stack() builds a new one when they change.
    State: (h, c), each (N, M, L, H): rows first, as decoding.py wants; M members."""

    def __init__(self, decoders: list[CaptionDecoder]):
        cfg = decoders[0].cfg
        self.num_layers, self.hidden_dim = cfg.num_layers, cfg.hidden_dim
        lstms = [d.lstm for d in decoders]

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([getattr(lstm, name) for lstm in lstms])

        # Normal tensors even when built under inference_mode, without autograd history.
        with torch.inference_mode(False), torch.no_grad():
            # One product over all V rows: a row's result is the same in any batch of >= 8 rows
            # (api.MIN_DECODE_ROWS), so these are the numbers a step computed for each word.
            self.word_gates = torch.stack([F.linear(d.embed.weight, d.lstm.weight_ih_l0, d.lstm.bias_ih_l0)
                                           for d in decoders])                          # (M, V, 4H)
            # Weights as (M, in, out) views of (M, out, in), the layout F.linear hands to the GEMM.
            self.w_hh = [stacked(f"weight_hh_l{layer}").transpose(1, 2) for layer in range(self.num_layers)]
            self.b_hh = [stacked(f"bias_hh_l{layer}")[:, None] for layer in range(self.num_layers)]
            self.w_ih = [None] + [stacked(f"weight_ih_l{layer}").transpose(1, 2)
                                  for layer in range(1, self.num_layers)]
            self.b_ih = [None] + [stacked(f"bias_ih_l{layer}")[:, None] for layer in range(1, self.num_layers)]
            self.readout_w = torch.stack([d.readout.weight for d in decoders]).transpose(1, 2)  # (M, H, V)
            self.readout_b = torch.stack([d.readout.bias for d in decoders])[:, None]          # (M, 1, V)

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (N,), state (h, c) each (N, M, L, H) -> each member's logprobs (M, N, V), new state."""
        h, c = (s.transpose(0, 1) for s in state)                                     # (M, N, L, H)
        x = None
        h_out, c_out = [], []
        for layer in range(self.num_layers):
            recurrent = torch.baddbmm(self.b_hh[layer], h[:, :, layer], self.w_hh[layer])   # (M, N, 4H)
            if layer == 0:
                gates = self.word_gates.index_select(1, tokens) + recurrent
            else:
                gates = torch.baddbmm(self.b_ih[layer], x, self.w_ih[layer]) + recurrent
            i, f, g, o = gates.chunk(4, dim=2)
            c_new = torch.sigmoid(f) * c[:, :, layer] + torch.sigmoid(i) * torch.tanh(g)    # (M, N, H)
            x = torch.sigmoid(o) * torch.tanh(c_new)                                  # (M, N, H)
            h_out.append(x)
            c_out.append(c_new)
        logprobs = F.log_softmax(torch.baddbmm(self.readout_b, x, self.readout_w), dim=-1)  # (M, N, V)
        return logprobs, (torch.stack(h_out, 2).transpose(0, 1), torch.stack(c_out, 2).transpose(0, 1))


def target_lengths(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Words each caption of tokens (B, T) predicts: everything after <start> up to <end>. On the
    CPU, as pack_padded_sequence wants."""
    return (tokens[:, 1:] != pad_id).sum(1).cpu()                           # (B,)


def packed_targets(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The next words (N,) in the order of CaptionDecoder.forward(..., packed=True)'s logits."""
    return pack_padded_sequence(tokens[:, 1:], target_lengths(tokens, pad_id), batch_first=True,
                                enforce_sorted=False).data                  # (N,)


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of next-word prediction over real tokens only (padding masked).
    logits: (B, T, V) from forward(), or (N, V) from forward(..., packed=True)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), packed_targets(tokens, pad_id),
                               label_smoothing=label_smoothing)
    predictions = logits[:, :-1].reshape(-1, logits.shape[-1])   # (B*(T-1), V)
    targets = tokens[:, 1:].reshape(-1)                           # (B*(T-1),)
    return F.cross_entropy(predictions.float(), targets, ignore_index=pad_id,
                           label_smoothing=label_smoothing)
