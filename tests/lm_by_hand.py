"""A LLaVA model's language model run one decoder layer at a time, by hand, for reference results.

Only transformers' own modules are used (embeddings from the model's own forward, decoder layers,
rotary module, norm and LM head); no attnkit code. The caller decides before each layer which rows go
on and in what order (``before``), and whether positions are the tokens' own or renumbered 0..n-1, so
that pruning layouts can be checked against what the model computes on the sequence written out by
hand. One unpadded row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import attnkit


def prompt_embeddings(model, inputs) -> torch.Tensor:
    """(S, d) the language model's input: token embeddings with the image features in place."""
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[0][0]


def token_embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    """(n, d) embeddings of text tokens ``ids`` (n,)."""
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


def rotary(model, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_decoder().rotary_emb(hidden[None], positions[None])


def causal(n: int, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return mask[None, None]


def layer_probs(model, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(H, n, n) causal attention probabilities of decoder layer ``layer`` on ``hidden`` (n, d) at
    ``positions`` (n,), from its own q/k projections."""
    block = model.get_decoder().layers[layer]
    attn = block.self_attn
    n, hd = hidden.shape[0], attn.head_dim
    with torch.no_grad():
        x = block.input_layernorm(hidden[None])
        q = attn.q_proj(x).view(1, n, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, -1, hd).transpose(1, 2)
        cos, sin = rotary(model, hidden, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        scores = q @ k.transpose(-1, -2) * attn.scaling + causal(n, q.dtype)
        return scores.softmax(-1)[0]


Before = Callable[[int, torch.Tensor, list, tuple | None], tuple[torch.Tensor, list]]


def run(model, hidden: torch.Tensor, ids: list, before: Before, renumber: bool) -> tuple[torch.Tensor, list]:
    """Logits (n, V) of the rows left after the last layer, and their ids.

    ``hidden`` (S, d) and ``ids`` (a label per row; the original position of a prompt token) enter layer
    0. Before each layer i, ``before(i, hidden, ids, prev)`` returns the rows that go on and their ids
    (``hidden``: layer i-1's output; ``prev``: layer i-1's input and positions, or None before layer 0,
    for selections made from layer i-1's attention). Positions: 0..n-1 over the rows a layer holds with
    ``renumber``, else the ids.
    """
    lm = model.get_decoder()
    prev = None
    with torch.no_grad():
        for i, block in enumerate(lm.layers):
            hidden, ids = before(i, hidden, ids, prev)
            n = hidden.shape[0]
            positions = torch.arange(n) if renumber else torch.tensor(ids)
            prev = (hidden, positions)
            out = block(
                hidden[None],
                attention_mask=causal(n, hidden.dtype),
                position_ids=positions[None],
                position_embeddings=rotary(model, hidden, positions),
            )
            hidden = (out[0] if isinstance(out, tuple) else out)[0]
        return model.lm_head(lm.norm(hidden[None]))[0], ids


def check_both_layouts(model, inputs, make_method, by_hand, n_new: int = 5) -> dict[str, torch.Tensor]:
    """For positions "original" and "official": the wrapped model's cached greedy generate gives at every
    step the logits ``by_hand(model, inputs, renumber, new_tokens_so_far)`` computes for the whole
    sequence (atol 1e-4; its prefill logits to 1e-5), and its drops list the kept prompt positions the
    by-hand run gives per layer, in order. Returns the last prompt position's logits per layout."""
    s_len = inputs["input_ids"].shape[1]
    last = {}
    for positions in ("original", "official"):
        with torch.no_grad(), attnkit.wrap(model, make_method(positions)) as handle:
            last[positions] = model(**inputs).logits[0, -1]
            drops = [(layer, pos[0].tolist()) for layer, pos in handle.state.drops]
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, s_len:]
        for t in range(n_new):
            ref, kept = by_hand(model, inputs, positions == "official", new[:t])
            torch.testing.assert_close(out.logits[t][0], ref[-1], atol=1e-4, rtol=0, msg=f"{positions} step {t}")
            if t == 0:
                assert drops == sorted(kept.items())
                torch.testing.assert_close(last[positions], ref[-1], atol=1e-5, rtol=0)
    return last
