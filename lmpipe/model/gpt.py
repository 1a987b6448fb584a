"""A GPT language model in the style of nanoGPT: one file, one config, nothing hidden.

Token + learned position embeddings, ``n_layer`` pre-norm transformer blocks
(LayerNorm -> causal self-attention, LayerNorm -> GELU MLP), a final LayerNorm
and an output head that shares its weight with the token embedding.

``arch="qwen3"`` swaps in Qwen3's block (transformers' ``Qwen3ForCausalLM``): no
position embedding but rotary positions on q and k, RMSNorm everywhere, RMSNorm
on each head's q and k (QK-norm), a SwiGLU MLP, no biases (optionally in
attention), grouped-query attention (``n_kv_head``), a tied or separate head.
The rest (loss, KV cache, packing, generation) is shared.

    >>> cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32)
    >>> model = GPT(cfg)
    >>> logits, loss = model(torch.zeros(1, 8, dtype=torch.long))
    >>> logits.shape            # without targets only the last position is projected
    torch.Size([1, 1, 256])

Generation encodes the prompt once and then one token per step, keeping every
layer's keys and values in a ``KVCache`` (see ``GPT.generate``).

Packed sequences: ``model(idx, targets, doc_sep=eot)`` treats every
``doc_sep`` token as the end of a document, so each position attends only to
earlier positions of its own document and position embeddings restart at 0
where a document starts (``packed_attention``; qwen3's rotary angles alike):
several short examples in one row are each seen exactly as if run alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from lmpipe.config.training import ModelConfig, Qwen3ModelConfig, default_intermediate_size

LN_EPS = 1e-5  # LayerNorm epsilon (GPT-2's; the transformers export states it)
IGNORE_INDEX = -1  # target value whose position does not count towards the loss (masked prompts)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms (qwen3: in attention's projections only)
    arch: str = "gpt2"  # "gpt2" | "qwen3" (the fields below are qwen3's: Qwen3Block)
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); qwen3: always set
    intermediate_size: int | None = None  # SwiGLU hidden width; qwen3: always set
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True  # qwen3 only; GPT-2's head is always the token embedding

    def __post_init__(self) -> None:
        if self.arch not in ARCH_FIELDS:
            raise ValueError(f"model arch {self.arch!r} is not one of {', '.join(map(repr, ARCH_FIELDS))}")
        if self.arch == "qwen3" and (self.n_kv_head is None or self.intermediate_size is None):
            raise ValueError("a qwen3 GPTConfig needs n_kv_head and intermediate_size (GPTConfig.from_config "
                             "resolves them)")

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int) -> GPTConfig:
        """The model section of the pipeline config plus the tokenizer's vocabulary size."""
        config = cls(
            vocab_size=vocab_size,
            block_size=model_cfg.block_size,
            n_layer=model_cfg.n_layer,
            n_head=model_cfg.n_head,
            n_embd=model_cfg.n_embd,
            dropout=model_cfg.dropout,
            bias=model_cfg.bias,
        )
        if not isinstance(model_cfg, Qwen3ModelConfig):
            return config
        return replace(
            config,
            arch="qwen3",
            n_kv_head=model_cfg.n_kv_head or model_cfg.n_head,
            intermediate_size=model_cfg.intermediate_size or default_intermediate_size(model_cfg.n_embd),
            rope_theta=model_cfg.rope_theta,
            rms_norm_eps=model_cfg.rms_norm_eps,
            tie_embeddings=model_cfg.tie_embeddings,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields a checkpoint records (state.json's ``model``): a GPT-2's without the qwen3 fields, so its
        files read as they always have, and ``GPTConfig(**d)`` builds it again."""
        d = asdict(self)
        if self.arch == "gpt2":
            for name in _QWEN3_ONLY:
                d.pop(name)
        return d

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head


# The fields that decide the weights' shapes and meaning, per arch (dropout is a training-time choice, and a
# checkpoint is valid with any dropout): what a checkpoint must match to be resumed or fine-tuned.
ARCH_FIELDS = {
    "gpt2": ("n_layer", "n_head", "n_embd", "block_size", "bias"),
    "qwen3": ("n_layer", "n_head", "n_embd", "block_size", "bias", "n_kv_head", "intermediate_size", "rope_theta",
              "rms_norm_eps", "tie_embeddings"),
}
_QWEN3_ONLY = ("arch", "n_kv_head", "intermediate_size", "rope_theta", "rms_norm_eps", "tie_embeddings")


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LN_EPS)


class KVCache:
    """Keys and values of every layer for the tokens encoded so far, for incremental decoding.

    A decoding step then computes q, k, v for its new token only and attends
    over the stored ones, instead of re-encoding the whole sequence. Buffers
    hold ``block_size`` positions (the most the position embeddings allow) and
    are allocated on first use with the batch size, dtype and device of the
    keys, so one cache serves fp32 and autocast alike; a step writes in place
    rather than concatenating, which would copy the whole cache every token.

    Keys carry their absolute position (the position embedding is added before
    the first layer; qwen3's keys are stored rotated), so a full cache cannot
    slide: ``reset`` and re-encode the last ``block_size`` tokens instead. With
    grouped-query attention it holds the ``n_kv_head`` key/value heads only.
    """

    def __init__(self, config: GPTConfig) -> None:
        self.max_len = config.block_size
        self.length = 0  # positions filled, the same in every layer
        self.k: list[torch.Tensor | None] = [None] * config.n_layer  # each (B, nkv, max_len, hs)
        self.v: list[torch.Tensor | None] = [None] * config.n_layer  # each (B, nkv, max_len, hs)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer's k, v (B, nh, T, hs) after the cached positions; return all of them (B, nh, length + T, hs).

        ``length`` is advanced by the model once every layer has appended.
        """
        buf_k, buf_v = self.k[layer], self.v[layer]
        if buf_k is None or buf_v is None:
            B, nh, _, hs = k.shape
            buf_k = self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            buf_v = self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = self.length + k.size(2)
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def reset(self) -> None:
        """Forget the cached tokens; the buffers are kept for the next prefill."""
        self.length = 0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache | None, layer_idx: int,
           attn_mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """Scaled dot-product attention of q (B, nh, T, hs) over k, v (B, nkv, T, hs) -> (B, nh, T, hs).

    nkv < nh is grouped-query attention (each key/value head serves nh / nkv query heads).
    With kv_cache, k and v continue the cached tokens: they are appended and the queries
    attend over the cached keys as well as their own. attn_mask (B, 1, T, T) bool, True =
    may attend, replaces the causal mask (packed documents, see ``packed_attention``); not
    combined with kv_cache.
    """
    gqa = k.size(1) != q.size(1)
    T = q.size(2)
    if attn_mask is not None:
        # Packed documents: block-diagonal causal. An explicit mask rules out the flash
        # kernel (the memory-efficient one runs instead), so only this path pays for it.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
    if kv_cache is None:
        # Training and uncached inference. Fused kernel (flash attention on GPU);
        # is_causal masks out future positions.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    start = kv_cache.length
    k, v = kv_cache.append(layer_idx, k, v)  # (B, nkv, S, hs), S = start + T
    if T == 1:
        # One query (a decoding step) may see every key: no mask.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=gqa)
    if start == 0:
        # Prefill: keys are exactly the T new ones, so the plain causal mask fits.
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    # Several tokens after a non-empty cache: is_causal would align the mask's
    # top-left corner, so query i (absolute position start + i) gets an explicit one.
    mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # query, key and value projections for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # this layer's slot in a KVCache

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C).

        With kv_cache, x continues the cached tokens: its k, v are appended and
        its queries attend over the cached keys as well as its own. attn_mask
        (B, 1, T, T) bool, True = may attend, replaces the causal mask (packed
        documents, see ``packed_attention``); not combined with kv_cache.
        """
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = attend(q, k, v, kv_cache, self.layer_idx, attn_mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm: the residual stream itself is never normalized, which keeps deep stacks trainable."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """The GPT's body, named as nanoGPT's ``transformer`` dict (so checkpoints keep GPT-2's key names):
    token and position embeddings, dropout, the blocks, the final norm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)


# ---------------------------------------------------------------- Qwen3's block (arch "qwen3")
# Named as transformers' Qwen3 layers (self_attn.q_proj, mlp.down_proj, ...), so the export renames only the
# containers (``transformers_name``) and LoRA targets are the names peft users know.


def rotary(pos: torch.Tensor, head_size: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., T, hs) of the rotary embeddings (Su et al. 2021) at positions pos (T,) or (B, T).

    Computed as transformers' Qwen3RotaryEmbedding does (fp32, each frequency twice: the
    "rotate half" layout), so the export's logits match ours.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float, device=pos.device) / head_size))
    freqs = pos[..., None].float() * inv_freq  # (..., T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hs)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) by its positions' angles: pairs (i, i + hs/2) turn by the same angle."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Qwen3Attention(nn.Module):
    """Causal self-attention with RMSNorm on each head's queries and keys (QK-norm) and rotary positions."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        assert config.n_kv_head is not None
        hs, nh, nkv, C = config.head_size, config.n_head, config.n_kv_head, config.n_embd
        self.q_proj = nn.Linear(C, nh * hs, bias=config.bias)
        self.k_proj = nn.Linear(C, nkv * hs, bias=config.bias)
        self.v_proj = nn.Linear(C, nkv * hs, bias=config.bias)
        self.o_proj = nn.Linear(nh * hs, C, bias=config.bias)
        # Per head, over hs: bounds the attention logits, so a higher learning rate stays stable.
        self.q_norm = nn.RMSNorm(hs, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hs, eps=config.rms_norm_eps)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_kv_head, self.head_size = nh, nkv, hs
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # this layer's slot in a KVCache

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); rope: cos, sin (1 or B, 1, T, hs) of x's positions; the rest as ``attend``."""
        B, T, C = x.size()
        hs = self.head_size
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_head, hs)).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
        cos, sin = rope
        # Cached keys are stored rotated: each keeps its absolute position, as GPT-2's do.
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)  # fp32 angles
        y = attend(q, k, v, kv_cache, self.layer_idx, attn_mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * hs)  # (B, T, nh * hs)
        return self.resid_dropout(self.o_proj(y))


class SwiGLU(nn.Module):
    """Gated MLP (Shazeer 2020): down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.intermediate_size is not None
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Qwen3Block(nn.Module):
    """Pre-norm, as GPT-2's Block, with RMSNorm (no mean, no bias) in place of LayerNorm."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, attn_mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Qwen3Transformer(nn.Module):
    """The body under the same container names as GPT-2's (``transformer.wte``, ``.h``, ``.ln_f``), so
    checkpoints, FSDP's per-block wrapping and the classifier's hook treat both alike; no position embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Qwen3Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.RMSNorm(config.n_embd, eps=config.rms_norm_eps)


def transformers_name(name: str, arch: str) -> str:
    """A parameter's or module's name in the transformers export of ``arch``.

    GPT-2's are ours (nanoGPT kept them); Qwen3's blocks are named as transformers names them,
    under other containers: ``transformer.h.0.self_attn.q_proj`` is ``model.layers.0.self_attn.q_proj``.
    """
    if arch == "gpt2" or name.startswith("lm_head"):
        return name
    for ours, theirs in (("transformer.h.", "model.layers."), ("transformer.wte", "model.embed_tokens"),
                         ("transformer.ln_f", "model.norm")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"{name!r} is not a weight of the {arch} model")


_RESIDUAL_PROJECTIONS = ("c_proj.weight", "o_proj.weight", "down_proj.weight")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer: Transformer | Qwen3Transformer
        if config.arch == "qwen3":
            self.transformer = Qwen3Transformer(config)
        else:
            self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.arch == "gpt2" or config.tie_embeddings:
            # Weight tying (Press & Wolf 2017): reading a token and predicting it use one
            # matrix; fewer parameters and better small-model perplexity.
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: each residual projection adds to the stream, 2 per layer; scaling their
        # init by 1/sqrt(2 * n_layer) keeps the stream's variance independent of depth.
        for name, p in self.named_parameters():
            if name.endswith(_RESIDUAL_PROJECTIONS):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (the tied embedding counted once).

        non_embedding=True leaves out the position embeddings only: the token
        embedding is also the output layer, so its FLOPs are real (nanoGPT's convention).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding and isinstance(self.transformer, Transformer):
            n -= self.transformer.wpe.weight.numel()
        elif non_embedding and not self.tied:
            n -= self.transformer.wte.weight.numel()  # an untied input embedding is a lookup too
        return n

    @property
    def tied(self) -> bool:
        """Whether the output head is the token embedding (always for GPT-2; qwen3: ``tie_embeddings``)."""
        return self.config.arch == "gpt2" or self.config.tie_embeddings

    def flops_per_token(self) -> int:
        """Training FLOPs per token, forward + backward (PaLM appendix B, as in nanoGPT).

        6N for the matmuls with the weights, N = all parameters except the position
        embeddings (a lookup, no FLOPs; the tied token embedding counts through the
        output layer), plus 12*L*H*Q*T for attention's score and value matmuls, with
        L layers, H heads, Q head size and T the context length.
        """
        c = self.config
        N = self.num_params(non_embedding=True)
        L, H, Q, T = c.n_layer, c.n_head, c.n_embd // c.n_head, c.block_size
        return 6 * N + 12 * L * H * Q * T

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        doc_sep: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T) (IGNORE_INDEX where a position does not count): logits
        (B, T, V) and the mean cross-entropy over the counted positions. Without:
        logits (B, 1, V) for the last position only (all generation needs) and None.

        With kv_cache, idx continues the tokens the cache holds: its positions
        start at ``kv_cache.length``, its keys and values are appended, and the
        logits are those the full sequence would give at these positions.

        With doc_sep (a token id, e.g. end-of-text), each row is a pack of
        documents, each ending with doc_sep: a position attends only within its
        own document and its position embedding counts from that document's
        start (``packed_attention``), so every document gets the logits it would
        get alone. doc_sep=None is the plain causal path (flash attention).
        """
        B, T = idx.size()
        if doc_sep is not None and kv_cache is not None:
            raise ValueError("doc_sep (packed documents) cannot be combined with kv_cache (incremental decoding)")
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of length {start + T} exceeds model.block_size={self.config.block_size}"
                + (f" ({start} cached + {T} new)" if start else "")
            )
        attn_mask = None
        if doc_sep is None:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,) absolute positions
        else:
            attn_mask, pos = packed_attention(idx, doc_sep)  # (B, 1, T, T), (B, T) positions within the document
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        if isinstance(self.transformer, Transformer):
            pos_emb = self.transformer.wpe(pos)  # (T, C) broadcast over the batch, or (B, T, C)
            x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
            for block in self.transformer.h:
                x = block(x, kv_cache, attn_mask)
        else:
            # Rotary: positions enter each layer's q and k, as angles of the document's own positions.
            cos, sin = rotary(pos, self.config.head_size, self.config.rope_theta)  # (T, hs) or (B, T, hs)
            rope = (cos.unsqueeze(-3), sin.unsqueeze(-3))  # (1 or B, 1, T, hs): broadcast over heads
            x = self.transformer.drop(tok_emb)  # (B, T, C)
            for block in self.transformer.h:
                x = block(x, rope, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.length += T  # every layer has appended its k, v for these T positions
        x = self.transformer.ln_f(x)  # (B, T, C)

        if targets is None:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, V); the list index keeps the time dim
            return logits, None
        logits = self.lm_head(x)  # (B, T, V)
        flat_logits = logits.view(-1, logits.size(-1)).float()  # (B*T, V); fp32 for a stable softmax
        flat_targets = targets.reshape(-1)  # (B*T,); reshape: targets may be a strided slice
        # Sum / count instead of reduction="mean": a batch whose targets are all masked
        # (possible with long SFT prompts) gives loss 0 instead of 0/0 = NaN.
        loss_sum = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
        count = (flat_targets != IGNORE_INDEX).sum().clamp(min=1)
        return logits, loss_sum / count

    def configure_optimizer(
        self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW that decays matrices (matmul weights, embeddings) but not biases and LayerNorm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused CUDA kernel updates all parameters in one launch.
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda" or None)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens tokens to idx (B, T); returns (B, T + n), n <= max_new_tokens.

        Each step divides the last position's logits by ``temperature`` (0: greedy,
        argmax, no sampling), keeps the ``top_k`` most likely tokens and of those
        the nucleus (``top_p``, see ``filter_logits``), and samples with
        ``torch.multinomial``; pass a seeded ``torch.Generator`` (on the model's
        device) for reproducible samples. With ``eos_id`` a row that produced it
        is finished: its later positions are ``eos_id``, and generation stops
        early (n < max_new_tokens) once every row is finished.

        use_cache encodes the prompt once and then only the new token per step
        (``KVCache``); the tokens equal those without it. Position embeddings
        exist for block_size positions only, so once the sequence is longer the
        model sees its last block_size tokens, and since cached keys carry their
        absolute positions the cache cannot slide: from then on every step
        rebuilds it from that window (as costly as use_cache=False).
        Call ``model.eval()`` first unless dropout during sampling is wanted.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        _check_filter_args(top_k, top_p)
        block_size = self.config.block_size
        cache = KVCache(self.config) if use_cache else None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device) if eos_id is not None else None  # (B,)
        for _ in range(max_new_tokens):
            if cache is not None and 0 < cache.length < block_size:
                logits, _ = self(idx[:, -1:], kv_cache=cache)  # only the newest token, at position cache.length
            else:
                # First step, no cache, or a full window: (re-)encode the last block_size tokens.
                if cache is not None:
                    cache.reset()
                logits, _ = self(idx[:, -block_size:], kv_cache=cache)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)  # (B, V)
                idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if done is not None:
                idx_next = idx_next.masked_fill(done[:, None], eos_id)  # finished rows pad with eos
                done |= idx_next[:, 0] == eos_id
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
            if done is not None and bool(done.all()):
                break
        return idx


def packed_attention(idx: torch.Tensor, doc_sep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and positions of rows idx (B, T) that pack documents ending with ``doc_sep``.

    The separator closes its own document, so the document of position t is the
    number of separators strictly before t (an exclusive cumsum); a row need not
    start or end at a document boundary (a window cut from a packed stream).
    Returns ``mask`` (B, 1, T, T) bool, True where query t may attend key s: same
    document and s <= t (block-diagonal causal; the diagonal is always True, so
    no softmax row is empty), and ``pos`` (B, T): t minus its document's first
    position, i.e. the number of earlier positions t may attend. Tensor ops
    only, no loop over positions, so torch.compile traces it as one graph.
    """
    T = idx.size(1)
    is_sep = (idx == doc_sep).long()  # (B, T)
    doc = torch.cumsum(is_sep, dim=1) - is_sep  # (B, T): separators strictly before t
    t = torch.arange(T, device=idx.device)
    causal = t[:, None] >= t[None, :]  # (T, T): query row, key column
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    pos = mask.sum(dim=-1) - 1  # (B, T): keys of the same document up to and including t, less t itself
    return mask[:, None], pos


def _check_filter_args(top_k: int | None, top_p: float | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits (..., V) with the tokens outside the top-k and the nucleus set to -inf; the input is left as is.

    top_k keeps the k largest logits (ties with the k-th are kept too). top_p
    (nucleus sampling, Holtzman et al. 2019) then keeps the smallest set of the
    most likely tokens whose probability adds up to at least top_p, which is
    never empty. top_k=None and top_p=None or 1.0 return the logits unchanged.
    """
    _check_filter_args(top_k, top_p)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (..., V)
        probs = F.softmax(sorted_logits, dim=-1)  # (..., V)
        # A token stays if the more likely ones before it have not reached top_p yet;
        # the most likely has nothing before it (0 < top_p), so one token always stays.
        before = F.pad(torch.cumsum(probs, dim=-1)[..., :-1], (1, 0))  # (..., V): exclusive prefix sums
        drop_sorted = before >= top_p  # (..., V), in sorted order
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # (..., V), back in vocabulary order
        logits = logits.masked_fill(drop, -float("inf"))
    return logits
