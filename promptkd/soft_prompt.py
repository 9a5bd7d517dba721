"""The learnable soft prompt prepended to the frozen teacher's input embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from promptkd.models import position_ids_from_mask

SAFETENSORS_KEY = "soft_prompt"


class SoftPrompt(nn.Module):
    """`length` trainable vectors of the teacher's embedding size."""

    def __init__(self, length: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(length, hidden_size))

    @property
    def length(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_text(cls, teacher, tokenizer, text: str, length: int) -> "SoftPrompt":
        """Initialise from the teacher's embeddings of `text`, repeated or cut to `length` vectors."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"soft_prompt_init={text!r} has no tokens: use a non-empty text.")
        ids = (ids * (length // len(ids) + 1))[:length]
        embeddings = teacher.get_input_embeddings().weight.detach()[ids].float().clone()  # (L, D)
        prompt = cls(length, embeddings.shape[1])
        prompt.weight.data.copy_(embeddings)
        return prompt

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)  # (B, L, D)

    def state_tensors(self) -> dict:
        return {SAFETENSORS_KEY: self.weight.detach().cpu().contiguous()}


def load_soft_prompt(path: Path) -> SoftPrompt:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if SAFETENSORS_KEY not in tensors:
        raise ValueError(f"{path} has no tensor named {SAFETENSORS_KEY!r}: it is not a promptkd soft prompt file.")
    weight = tensors[SAFETENSORS_KEY]
    prompt = SoftPrompt(weight.shape[0], weight.shape[1])
    prompt.weight.data.copy_(weight)
    return prompt


def teacher_forward(
    teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    soft_prompt: Optional[SoftPrompt] = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Teacher logits, with the soft prompt prepended when given.

    The soft prompt goes in front of the (left-padded) sequence; positions come from the attention mask,
    so padding and the prompt shift no real token's position. `logits_to_keep` > 0 keeps the head output
    of the last positions only. Returns (B, T', V).
    """
    if soft_prompt is None:
        position_ids = position_ids_from_mask(attention_mask)
        return teacher(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=logits_to_keep
        ).logits

    batch_size = input_ids.shape[0]
    token_embeds = teacher.get_input_embeddings()(input_ids)  # (B, T, D)
    prompt_embeds = soft_prompt(batch_size).to(device=token_embeds.device, dtype=token_embeds.dtype)  # (B, L, D)
    inputs_embeds = torch.cat([prompt_embeds, token_embeds], dim=1)  # (B, L + T, D)
    prompt_mask = torch.ones(batch_size, soft_prompt.length, dtype=attention_mask.dtype, device=attention_mask.device)
    full_mask = torch.cat([prompt_mask, attention_mask], dim=1)  # (B, L + T)
    position_ids = position_ids_from_mask(full_mask)
    return teacher(
        inputs_embeds=inputs_embeds, attention_mask=full_mask, position_ids=position_ids, logits_to_keep=logits_to_keep
    ).logits
