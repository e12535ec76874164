"""Graded tests of the assignment kv_cache (model.py: KVCache.update, LlamaAttention.forward, LlamaModel.forward).

The reference is the plain full forward over the whole sequence: feeding the same tokens through the cache in chunks
(a prefill, then a few tokens, then one at a time) must give the same logits at every position. The micro model gets
large random weights, so a token at a wrong rotary position or a missing key changes the logits visibly.
"""

import pytest
import torch

import model as M

TOL = 1e-3  # the logits are of order 10; two correct paths differ by float rounding only


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    net = M.VLM(M.get_config("micro", tie_word_embeddings=False))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:  # a unit-variance token table, 1/sqrt(fan-in) matrices: outputs change at every step
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed_tokens" in name else p[0].numel() ** -0.5))
    return net.eval()


def tokens(rows, length, seed):
    """Random text ids above the image placeholder's (3), (rows, length) long."""
    return torch.randint(4, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def cached(vlm, ids, chunks, attention_mask=None):
    """Logits of every position, fed through one cache in chunks of these lengths; the first chunk is the prefill."""
    cache = M.KVCache(vlm.config.text, batch_size=ids.shape[0], max_len=ids.shape[1])
    out, start = [], 0
    with torch.no_grad():
        for i, n in enumerate(chunks):
            mask = attention_mask[:, start:start + n] if attention_mask is not None and i == 0 else None
            out.append(vlm(ids[:, start:start + n], attention_mask=mask, cache=cache)[0])
            start += n
    return torch.cat(out, dim=1), cache


def full(vlm, ids, attention_mask=None):
    with torch.no_grad():
        return vlm(ids, attention_mask=attention_mask)[0]


def test_update_writes_the_chunk_after_the_cached_slots():
    cfg = M.get_config("micro").text
    cache = M.KVCache(cfg, batch_size=2, max_len=6)
    g = torch.Generator().manual_seed(1)
    k1, v1, k2, v2 = (torch.randn(2, cfg.num_key_value_heads, n, cfg.head_dim, generator=g) for n in (3, 3, 2, 2))
    k, v = cache.update(1, k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    assert cache.length == 0  # LlamaModel.forward moves it, once for all layers
    cache.length = 3
    k, v = cache.update(1, k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    assert not cache.k[0].any() and not cache.v[0].any()  # layer 0 untouched


def test_a_full_forward_is_causal(vlm):
    a = tokens(1, 10, seed=2)
    b = torch.cat([a[:, :6], tokens(1, 4, seed=3)], dim=1)  # the same first 6 tokens
    la, lb = full(vlm, a), full(vlm, b)
    assert (la[:, :6] - lb[:, :6]).abs().max() <= TOL  # a later token never changes an earlier position
    assert (la[:, 6:] - lb[:, 6:]).abs().max() > 100 * TOL


def test_cached_decoding_equals_a_full_forward(vlm):
    ids = tokens(2, 12, seed=4)
    logits, cache = cached(vlm, ids, [5, 4, 1, 1, 1])  # prefill, a chunk of 4, then one token at a time
    assert (logits - full(vlm, ids)).abs().max() <= TOL
    assert cache.length == 12 and cache.pos.tolist() == [12, 12]


def test_one_row_one_token_at_a_time(vlm):
    ids = tokens(1, 9, seed=5)
    logits, _ = cached(vlm, ids, [1] * 9)  # no prefill at all: every token alone
    assert (logits - full(vlm, ids)).abs().max() <= TOL


def test_the_newest_token_attends_to_the_first(vlm):
    ids = tokens(1, 8, seed=6)
    other = ids.clone()
    other[0, 0] = 4 if ids[0, 0] != 4 else 5
    last, _ = cached(vlm, ids, [4, 1, 1, 1, 1])
    changed, _ = cached(vlm, other, [4, 1, 1, 1, 1])
    assert (last[:, -1] - changed[:, -1]).abs().max() > 100 * TOL  # the cached first key is still seen


def test_left_padded_rows_decode_like_each_row_alone(vlm):
    lengths, new = [3, 7, 5], tokens(3, 3, seed=7)  # three prompts, then three tokens for each row
    prompts = [tokens(1, n, seed=10 + n)[0] for n in lengths]
    T = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths])
    logits, cache = cached(vlm, torch.cat([ids, new], 1), [T, 1, 1, 1], attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = full(vlm, torch.cat([p, new[i]])[None])
        assert (logits[i, T - len(p):] - alone[0]).abs().max() <= TOL, f"row {i}"
    assert cache.pos.tolist() == [n + 3 for n in lengths]  # positions count real tokens only
    assert cache.length == T + 3 and cache.padded


def test_a_padded_full_forward_equals_each_row_alone(vlm):
    prompts = [tokens(1, n, seed=20 + n)[0] for n in (2, 6)]
    ids = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), prompts[0]]), prompts[1]])
    mask = torch.tensor([[0] * 4 + [1] * 2, [1] * 6])
    logits = full(vlm, ids, attention_mask=mask)
    assert (logits[0, 4:] - full(vlm, prompts[0][None])[0]).abs().max() <= TOL
    assert (logits[1] - full(vlm, prompts[1][None])[0]).abs().max() <= TOL


def test_a_chunk_that_does_not_fit_is_a_value_error(vlm):
    cache = M.KVCache(vlm.config.text, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="max_len"), torch.no_grad():
        vlm(tokens(1, 5, seed=8), cache=cache)
