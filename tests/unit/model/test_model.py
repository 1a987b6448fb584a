"""The GPT: shapes, initial loss, weight tying, causality, parameter and FLOP counts, KV cache, sampling,
packed documents."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lmpipe.config.training import ModelConfig, Qwen3ModelConfig
from lmpipe.model.gpt import GPT, IGNORE_INDEX, GPTConfig, KVCache, filter_logits, packed_attention, rotary

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
# Qwen3's block with grouped-query attention: one key/value head serves both query heads.
TINY_QWEN3 = GPTConfig.from_config(Qwen3ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, n_kv_head=1), 256)
ARCHS = {"gpt2": TINY, "qwen3": TINY_QWEN3}


@pytest.fixture(params=list(ARCHS))
def model(request: pytest.FixtureRequest) -> GPT:
    """A tiny model of each arch: the tests that take it hold for both."""
    torch.manual_seed(0)
    return GPT(ARCHS[request.param]).eval()


def test_qwen3_config_resolves_its_defaults() -> None:
    assert TINY_QWEN3 == GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False,
                                   arch="qwen3", n_kv_head=1, intermediate_size=128, rope_theta=10000.0,
                                   rms_norm_eps=1e-6, tie_embeddings=True)
    # 8/3 of the width, rounded up to a multiple of 64; n_kv_head None is multi-head attention.
    cfg = GPTConfig.from_config(Qwen3ModelConfig(n_embd=768, n_head=12), 100)
    assert (cfg.intermediate_size, cfg.n_kv_head, cfg.head_size) == (2048, 12, 64)
    assert GPTConfig.from_config(Qwen3ModelConfig(n_embd=128), 100).intermediate_size == 384
    # What a checkpoint records: a GPT-2's fields as they always were, a qwen3's all of them.
    assert TINY.to_dict() == {"vocab_size": 256, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32,
                              "dropout": 0.0, "bias": True}
    assert GPTConfig(**TINY_QWEN3.to_dict()) == TINY_QWEN3 and GPTConfig(**TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="model arch 'llama' is not one of 'gpt2', 'qwen3'"):
        GPTConfig(vocab_size=8, arch="llama")


def test_qwen3_modules_are_named_as_transformers_names_them() -> None:
    m = GPT(TINY_QWEN3)
    names = [n for n, _ in m.named_parameters() if n.startswith("transformer.h.0.")]
    assert names == [f"transformer.h.0.{n}.weight" for n in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj")]
    shapes = {n.removeprefix("transformer.h.0."): tuple(p.shape) for n, p in m.named_parameters() if n in names}
    assert (shapes["self_attn.q_proj.weight"], shapes["self_attn.k_proj.weight"]) == ((32, 32), (16, 32))  # GQA
    assert shapes["self_attn.q_norm.weight"] == (16,) and shapes["mlp.gate_proj.weight"] == (128, 32)
    assert {n for n, _ in m.named_parameters() if not n.startswith("transformer.h.")} == {
        "transformer.wte.weight", "transformer.ln_f.weight"}  # no position embedding; the head is tied
    untied = GPT(replace(TINY_QWEN3, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight and not untied.tied
    # The untied input embedding is a lookup: left out of the count of parameters that cost FLOPs.
    assert untied.num_params(non_embedding=False) - untied.num_params() == 256 * 32
    assert untied.num_params(non_embedding=False) == m.num_params(non_embedding=False) + 256 * 32


def test_from_config_takes_model_section_and_vocab() -> None:
    cfg = GPTConfig.from_config(ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=8, dropout=0.1, bias=False), 300)
    assert cfg == GPTConfig(vocab_size=300, block_size=8, n_layer=3, n_head=2, n_embd=16, dropout=0.1, bias=False)


def test_shapes(model: GPT) -> None:
    idx = torch.randint(0, 256, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 256) and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 256) and loss is None
    with pytest.raises(ValueError, match="model.block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_last_position_logits_match_full_forward(model: GPT) -> None:
    idx = torch.randint(0, 256, (2, 12))
    full, _ = model(idx, idx)
    last, _ = model(idx)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_initial_loss_is_uniform_guess() -> None:
    # GPT-2 init makes every logit ~0, so the loss is that of a uniform guess: ln(vocab).
    torch.manual_seed(0)
    for vocab in (256, 4096):
        m = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32))
        x, y = torch.randint(0, vocab, (8, 32)), torch.randint(0, vocab, (8, 32))
        assert abs(m(x, y)[1].item() - math.log(vocab)) < 0.05


def test_ignore_index_drops_positions(model: GPT) -> None:
    idx = torch.randint(0, 256, (2, 8))
    targets = torch.randint(0, 256, (2, 8))
    masked = targets.clone()
    masked[:, :5] = IGNORE_INDEX
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 256), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    # All positions masked: 0, not 0/0 = NaN (an SFT window that is all prompt).
    _, loss = model(idx, torch.full_like(idx, IGNORE_INDEX))
    assert loss.item() == 0.0


def test_weights_are_tied(model: GPT) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight
    assert sum(1 for _ in model.parameters()) == len(dict(model.named_parameters()))  # counted once


def test_causal_future_tokens_do_not_change_past_logits(model: GPT) -> None:
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    assert torch.equal(a[:, :9], b[:, :9])  # exact: positions before 9 never see token 9
    assert not torch.equal(a[:, 9:], b[:, 9:])


def test_param_count_exact() -> None:
    model = GPT(TINY)
    V, T, C, L = 256, 16, 32, 2
    per_layer = (
        2 * C  # ln_1
        + C * 3 * C + 3 * C  # c_attn
        + C * C + C  # attn c_proj
        + 2 * C  # ln_2
        + C * 4 * C + 4 * C  # c_fc
        + 4 * C * C + C  # mlp c_proj
    )
    total = V * C + T * C + L * per_layer + 2 * C  # wte (= lm_head), wpe, blocks, ln_f
    assert total == 34176
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C  # position embeddings left out


def test_param_count_without_bias() -> None:
    m = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False))
    C = 32
    assert m.num_params() == 256 * C + 2 * (2 * C + 12 * C * C) + C


def test_qwen3_param_count_exact() -> None:
    V, C, L, hs, H = 256, 32, 2, 16, 128
    per_layer = (
        C  # input_layernorm
        + C * C + 2 * C * hs + C * C  # q_proj, k_proj and v_proj (one key/value head), o_proj
        + 2 * hs  # q_norm, k_norm
        + C  # post_attention_layernorm
        + 3 * C * H  # gate_proj, up_proj, down_proj
    )
    total = V * C + L * per_layer + C  # wte (= lm_head), blocks, ln_f
    m = GPT(TINY_QWEN3)
    assert m.num_params(non_embedding=False) == m.num_params() == total == 39136
    L, H, Q, T = 2, 2, 16, 16
    assert m.flops_per_token() == 6 * total + 12 * L * H * Q * T


def test_flops_per_token_exact() -> None:
    model = GPT(TINY)
    N = 34176 - 16 * 32
    L, H, Q, T = 2, 2, 16, 16
    assert model.flops_per_token() == 6 * N + 12 * L * H * Q * T == 214272


def test_init_scales_residual_projections() -> None:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=8, n_head=4, n_embd=256))
    proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(proj - 0.02 / math.sqrt(16)) < 0.0005
    assert abs(fc - 0.02) < 0.0005
    assert torch.count_nonzero(m.transformer.h[0].attn.c_attn.bias) == 0


def test_optimizer_decays_only_matrices(model: GPT) -> None:
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert not opt.defaults["fused"]


def test_generate_is_reproducible_with_a_seeded_generator(model: GPT) -> None:
    prompt = torch.tensor([[1, 2, 3]])

    def sample(seed: int, **kw: object) -> torch.Tensor:
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed), **kw)

    a = sample(7, temperature=0.8, top_k=5)
    assert a.shape == (1, 23) and torch.equal(a[:, :3], prompt)
    assert torch.equal(a, sample(7, temperature=0.8, top_k=5))
    assert not torch.equal(sample(7), sample(8))
    # top_k=1 is greedy: the same under any seed.
    assert torch.equal(sample(1, top_k=1), sample(2, top_k=1))


def test_generate_crops_context_to_block_size(model: GPT) -> None:
    out = model.generate(torch.zeros(2, 16, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 21)


def test_cached_steps_give_the_full_forwards_logits(model: GPT) -> None:
    idx = torch.randint(0, 256, (2, 16))
    cache = KVCache(model.config)
    logits, _ = model(idx[:, :7], kv_cache=cache)  # prefill
    assert cache.length == 7 and cache.k[0].shape == (2, model.config.n_kv_head or 2, 16, 16)  # GQA: fewer heads
    torch.testing.assert_close(logits, model(idx[:, :7])[0], atol=1e-5, rtol=0)
    for t in range(7, 16):  # one token at absolute position t
        step, _ = model(idx[:, t : t + 1], kv_cache=cache)  # (2, 1, V)
        full, _ = model(idx[:, : t + 1])  # (2, 1, V): last position of the whole sequence
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)
    assert cache.length == 16
    with pytest.raises(ValueError, match=r"length 17 exceeds model.block_size=16 \(16 cached \+ 1 new\)"):
        model(idx[:, :1], kv_cache=cache)


def test_cached_chunk_after_prefill_gives_the_full_forwards_logits(model: GPT) -> None:
    # Several tokens after a non-empty cache: the causal mask must be offset by the cached length.
    idx = torch.randint(0, 256, (2, 12))
    full, _ = model(idx, idx)  # (2, 12, V)
    cache = KVCache(model.config)
    model(idx[:, :5], kv_cache=cache)
    chunk, _ = model(idx[:, 5:], idx[:, 5:].contiguous(), kv_cache=cache)  # (2, 7, V)
    torch.testing.assert_close(chunk, full[:, 5:], atol=1e-5, rtol=0)
    cache.reset()  # the buffers are reused for a new sequence from position 0
    again, _ = model(idx[:, :9], idx[:, :9].contiguous(), kv_cache=cache)
    torch.testing.assert_close(again, full[:, :9], atol=1e-5, rtol=0)


@pytest.fixture(params=list(ARCHS))
def sharp(request: pytest.FixtureRequest) -> GPT:
    """Weights far from init, so that greedy decoding does not repeat one token forever."""
    torch.manual_seed(0)
    m = GPT(ARCHS[request.param]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m


@pytest.mark.parametrize("prompt_len", [3, 15, 16, 20])  # short, one step to a full window, full, longer
def test_cached_generation_equals_uncached(sharp: GPT, prompt_len: int) -> None:
    # 24 new tokens run past block_size=16, where the cache is rebuilt from the last 16 tokens each step.
    model = sharp
    torch.manual_seed(1)
    prompt = torch.randint(0, 256, (2, prompt_len))
    for kw in ({"temperature": 0.0}, {"temperature": 0.9}, {"temperature": 1.2, "top_k": 50, "top_p": 0.9}):
        out = {
            use_cache: model.generate(prompt, 24, generator=torch.Generator().manual_seed(3), use_cache=use_cache, **kw)
            for use_cache in (True, False)
        }
        assert out[True].shape == (2, prompt_len + 24) and torch.equal(out[True][:, :prompt_len], prompt)
        assert out[True].tolist() == out[False].tolist(), kw
        assert len(set(out[True][:, prompt_len:].flatten().tolist())) > (1 if kw["temperature"] == 0 else 10)


def test_temperature_zero_is_greedy(model: GPT) -> None:
    prompt = torch.randint(0, 256, (2, 4))
    expected = prompt
    for _ in range(10):
        logits, _ = model(expected)  # (2, 1, V)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for kw in ({}, {"top_k": 3, "top_p": 0.5}):
        out = model.generate(prompt, 10, temperature=0.0, generator=torch.Generator().manual_seed(5), **kw)
        assert out.tolist() == expected.tolist()


def test_eos_finishes_rows_and_stops_when_all_are_done(model: GPT) -> None:
    prompt = torch.randint(0, 256, (2, 4))

    def sample(p: torch.Tensor, **kw: object) -> torch.Tensor:
        return model.generate(p, 12, temperature=1.5, generator=torch.Generator().manual_seed(11), **kw)

    ref = sample(prompt)[:, 4:]  # (2, 12) new tokens without eos
    eos = ref[0, 5].item()  # row 0 produces it at step 5 (first time, as the check below requires)
    assert eos not in ref[0, :5].tolist() and eos not in ref[1].tolist()
    out = sample(prompt, eos_id=eos)
    # Row 0 is finished after step 5 and padded with eos; row 1 never produces it and runs on.
    # Sampling draws for every row each step, so row 1's draws are the same as without eos.
    assert out.shape == (2, 16)
    assert out[0, 4:].tolist() == ref[0, :6].tolist() + [eos] * 6
    assert out[1, 4:].tolist() == ref[1].tolist()
    # A batch whose every row is finished stops early (a batch of one draws differently from one of two).
    ref = sample(prompt[:1])[0, 4:]  # (12,)
    eos = ref[3].item()
    assert eos not in ref[:3].tolist()
    assert sample(prompt[:1], eos_id=eos).tolist() == [prompt[0].tolist() + ref[:4].tolist()]


def test_filter_logits_keeps_the_nucleus() -> None:
    # Probabilities 0.5, 0.25, 0.125, 0.09375, 0.03125 (cumulative 0.5, 0.75, 0.875, 0.96875, 1),
    # in a different vocabulary order per row.
    probs = torch.tensor([[0.03125, 0.5, 0.125, 0.09375, 0.25], [0.25, 0.09375, 0.5, 0.125, 0.03125]])
    logits = probs.log()
    for top_p, n_kept in ((0.3, 1), (0.5, 1), (0.7, 2), (0.8, 3), (0.9, 4), (0.97, 5)):
        kept = filter_logits(logits, top_p=top_p).isfinite()
        expected = probs >= sorted(probs[0].tolist(), reverse=True)[n_kept - 1]
        assert kept.tolist() == expected.tolist(), top_p
    # top_k first, then the nucleus of what is left: of 0.5, 0.25 (renormalised 2/3, 1/3) top_p=0.6 keeps one.
    assert filter_logits(logits, top_k=2, top_p=0.6).isfinite().sum(-1).tolist() == [1, 1]
    assert filter_logits(logits, top_k=2, top_p=0.7).isfinite().tolist() == (probs >= 0.25).tolist()
    # The most likely token is always kept, however small top_p.
    assert filter_logits(logits, top_p=1e-9).isfinite().tolist() == (probs == 0.5).tolist()


def test_filter_logits_top_k_and_identity() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    kept = filter_logits(logits, top_k=2)
    assert kept[0, [1, 3]].tolist() == [3.0, 3.0] and kept.isinf().sum().item() == 3
    assert filter_logits(logits, top_k=3).isfinite().tolist() == [[False, True, True, True, False]]
    assert logits.isfinite().all()  # the input is not modified
    for kw in ({}, {"top_p": 1.0}, {"top_k": 5, "top_p": 1.0}, {"top_k": 99}):
        assert torch.equal(filter_logits(logits, **kw), logits), kw


def test_bad_sampling_arguments_raise_naming_them(model: GPT) -> None:
    prompt = torch.tensor([[1, 2]])
    for kw, name in (
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"temperature": 0.0, "top_p": -1.0}, "top_p"),  # checked even when greedy ignores it
    ):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            model.generate(prompt, 2, **kw)
    with pytest.raises(ValueError, match="^top_p must be in"):
        filter_logits(torch.zeros(1, 4), top_p=2.0)


# ---------------------------------------------------------------- packed documents (doc_sep)

SEP = 0  # the separator token of these tests; documents draw their other tokens from 1..255


def _doc(n: int) -> torch.Tensor:
    """A document of n tokens: n - 1 random non-separators, then the separator that closes it."""
    return torch.cat((torch.randint(1, 256, (n - 1,)), torch.tensor([SEP])))


def test_packed_attention_segments_and_positions() -> None:
    # The separator belongs to the document it closes; the row may end mid-document.
    idx = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 0, 3, 4, 5, 6]])
    mask, pos = packed_attention(idx, SEP)
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3]]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert mask[1, 0, 1].int().tolist() == [0, 1, 0, 0, 0, 0] and mask[1, 0, 5].int().tolist() == [0, 0, 1, 1, 1, 1]


def test_packed_documents_get_the_logits_they_get_alone(model: GPT) -> None:
    docs = [_doc(4), _doc(6), _doc(5)]
    orders = [(0, 1, 2), (2, 0, 1)]  # two rows, so each document sits at different offsets
    rows = torch.stack([torch.cat([docs[i] for i in order]) for order in orders])  # (2, 15)
    packed, _ = model(rows, rows, doc_sep=SEP)  # (2, 15, V)
    alone = [model(d[None], d[None], doc_sep=SEP)[0][0] for d in docs]
    plain = [model(d[None], d[None])[0][0] for d in docs]  # one document: the same as the causal path
    for r, order in enumerate(orders):
        start = 0
        for i in order:
            n = len(docs[i])
            torch.testing.assert_close(packed[r, start : start + n], alone[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(packed[r, start : start + n], plain[i], atol=1e-5, rtol=0)
            start += n
    # Without doc_sep the later documents see the earlier ones and other positions: different logits.
    unpacked, _ = model(rows, rows)
    assert not torch.allclose(unpacked[0, 4:10], alone[1], atol=1e-3)


def test_doc_sep_without_separators_is_the_causal_forward(model: GPT) -> None:
    idx = torch.randint(1, 256, (3, 16))
    causal, causal_loss = model(idx, idx)
    packed, packed_loss = model(idx, idx, doc_sep=SEP)
    torch.testing.assert_close(packed, causal, atol=1e-6, rtol=0)
    torch.testing.assert_close(packed_loss, causal_loss, atol=1e-6, rtol=0)
    last, _ = model(idx, doc_sep=SEP)  # without targets: the last position only, as on the causal path
    torch.testing.assert_close(last[:, 0], causal[:, -1], atol=1e-6, rtol=0)


def test_no_gradient_and_no_influence_across_packed_documents(model: GPT) -> None:
    first, second = _doc(7), _doc(9)
    row = torch.cat((first, second))[None]  # (1, 16)
    targets = row.clone()
    targets[:, :7] = IGNORE_INDEX  # the loss of the second document only
    embeddings: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
        out.retain_grad()
        embeddings.append(out)

    hook = model.transformer.wte.register_forward_hook(keep)
    try:
        for doc_sep in (SEP, None):
            _, loss = model(row, targets, doc_sep=doc_sep)
            loss.backward()
    finally:
        hook.remove()
    packed_grad, causal_grad = (e.grad[0] for e in embeddings)  # (16, C) each
    assert torch.count_nonzero(packed_grad[:7]) == 0  # exactly: the first document's tokens do not matter
    assert bool((packed_grad[7:] != 0).all())
    assert bool((causal_grad[:7] != 0).any())  # the check would see a leak: the causal path has one

    # Changing every token of the first document but its separator leaves the second's logits as they were.
    changed = row.clone()
    changed[0, :6] = changed[0, :6] % 255 + 1
    a, _ = model(row, row, doc_sep=SEP)
    b, _ = model(changed, changed, doc_sep=SEP)
    torch.testing.assert_close(a[:, 7:], b[:, 7:], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :7], b[:, :7])


def test_doc_sep_with_kv_cache_is_refused(model: GPT) -> None:
    with pytest.raises(ValueError, match="doc_sep .* cannot be combined with kv_cache"):
        model(torch.ones(1, 4, dtype=torch.long), doc_sep=SEP, kv_cache=KVCache(model.config))


def test_packed_rotary_positions_restart_at_each_document() -> None:
    """Qwen3's q and k are rotated by each document's own positions (0, 1, ... from its start), as alone.

    Rotary attention depends on position differences only, so the logits of the test above would
    hardly tell; the angles the blocks receive do, exactly."""
    torch.manual_seed(0)
    model = GPT(TINY_QWEN3).eval()
    docs = [_doc(4), _doc(7), _doc(5)]
    row = torch.cat(docs)[None]  # (1, 16)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.transformer.h[0].register_forward_pre_hook(lambda _m, args: seen.append(args[1]))
    try:
        model(row, row, doc_sep=SEP)
        model(row, row)
    finally:
        hook.remove()
    (packed_cos, packed_sin), (plain_cos, plain_sin) = seen
    restart = torch.tensor([list(range(4)) + list(range(7)) + list(range(5))])  # (1, 16)
    cos, sin = rotary(restart, 16, 10000.0)  # (1, 16, hs)
    assert packed_cos.shape == (1, 1, 16, 16)
    assert torch.equal(packed_cos[:, 0], cos) and torch.equal(packed_sin[:, 0], sin)
    cos, sin = rotary(torch.arange(16), 16, 10000.0)  # (16, hs): the causal path counts from the row's start
    assert plain_cos.shape == (1, 16, 16)  # (1, T, hs): one set of angles for every row and head
    assert torch.equal(plain_cos[0], cos) and torch.equal(plain_sin[0], sin)
    assert not torch.equal(packed_cos[0, 0], plain_cos[0])
