"""The GPT: shapes, initial loss, weight tying, causality, parameter and FLOP counts, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lmpipe.config import ModelConfig
from lmpipe.model import GPT, IGNORE_INDEX, GPTConfig

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


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


def test_param_count_exact(model: GPT) -> None:
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


def test_flops_per_token_exact(model: GPT) -> None:
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
