"""Text samples of a model for the report, seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tokenizers import Tokenizer

from lmpipe.data.sft import END_TOKEN, Message, encode_chat_prompt
from lmpipe.model.gpt import GPT


def generate_samples(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    top_p: float | None = None,
    device: str | torch.device,
    start_id: int | None = None,
    chat: bool = False,
) -> list[dict[str, str]]:
    """Continue each prompt; returns ``[{"prompt", "completion"}, ...]`` in prompt order.

    Each prompt gets its own generator seeded with ``seed``, so a sample does
    not depend on which prompts came before it. A prompt that encodes to no
    tokens (the empty string) starts from ``start_id`` (the end-of-text token:
    "a new document begins"). ``chat``: each prompt is a user turn in the chat
    template (``lmpipe.data.sft``) followed by the open assistant turn, and the reply
    ends at its ``<|end|>`` token (not part of the completion): how an SFT model
    is prompted. Leaves the model in eval mode.
    """
    model.eval()
    samples = []
    end_id = tokenizer.token_to_id(END_TOKEN) if chat else None
    for i, prompt in enumerate(prompts):
        # In chat, the ids are laid out exactly as in SFT training (a prompt's literal "<|end|>" stays text).
        ids = (encode_chat_prompt([Message("user", prompt)], tokenizer) if chat
               else tokenizer.encode(prompt, add_special_tokens=False).ids)
        if not ids:
            if start_id is None:
                raise ValueError(f"eval.prompts[{i}] = {prompt!r} encodes to no tokens and no start_id was given")
            ids = [start_id]
        gen = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=gen, eos_id=end_id)
        new = out[0, len(ids) :].tolist()
        if end_id is not None and end_id in new:
            new = new[: new.index(end_id)]
        # Decode prompt and continuation together so a character split across the
        # boundary comes out whole; fall back to the new tokens alone otherwise.
        full = tokenizer.decode(ids + new, skip_special_tokens=False)
        head = tokenizer.decode(ids, skip_special_tokens=False)
        completion = full[len(head) :] if full.startswith(head) else tokenizer.decode(new, skip_special_tokens=False)
        samples.append({"prompt": prompt, "completion": completion})
    return samples
