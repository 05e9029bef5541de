"""The default model with its real weights (SmolLM2-135M-Instruct), for tests where output matters.

``model_dir()`` prepares it once per machine (``sglmesh model prepare``: a few seconds, cached).
Prompts are rendered with the model's own chat template through transformers' tokenizer, as
a user's chat request would be. ``PROMPTS`` are 20 chat questions of mixed lengths (two with
a long system prompt), for the parity and mesh tests.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from shared.model import DEFAULT_MODEL_NAME, prepare_default_model

__all__ = ["MODEL_NAME", "PROMPTS", "chat_ids", "model_dir", "tokenizer"]

MODEL_NAME = DEFAULT_MODEL_NAME

_LONG_SYSTEM = (
    "You are a careful assistant for a small public library. Answer questions about "
    "opening hours, membership, borrowing rules and events. The library opens at nine in the "
    "morning and closes at six in the evening on weekdays, and closes at two on Saturdays. It "
    "is closed on Sundays and public holidays. Members may borrow up to eight items at a time "
    "for three weeks, and may renew each item twice unless another member has reserved it. "
    "Membership is free for residents and costs twenty euros a year for everyone else. "
    "Children under twelve need a parent or guardian to sign their form. Late returns cost "
    "twenty cents per item per day, up to five euros per item. The reading room is quiet; "
    "group study rooms can be booked a week ahead at the front desk or online. Keep answers "
    "short, friendly and accurate, and say when you do not know."
)

PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": q}]
    for q in (
        "What is the capital of France?",
        "Hello!",
        "Write a haiku about the sea.",
        "Explain photosynthesis in simple terms.",
        "List three primary colors.",
        "What is 17 times 23?",
        "Tell me a joke about computers.",
        "Translate 'good morning' into Spanish.",
        "Who wrote Romeo and Juliet?",
        "Describe a cat in one sentence.",
        "Give me two tips for sleeping better.",
        "What is the boiling point of water at sea level?",
        "Name a famous painting by Leonardo da Vinci.",
        "Why is the sky blue?",
        "Write a short greeting for a birthday card.",
        "What does a compiler do?",
        "Suggest a name for a pet goldfish.",
        "How many days are in a leap year?",
    )
] + [
    [{"role": "system", "content": _LONG_SYSTEM}, {"role": "user", "content": q}]
    for q in ("Can I borrow ten books at once?", "When are you open on Saturday?")
]


def model_dir() -> Path:
    return prepare_default_model()


@functools.cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def chat_ids(messages: list[dict[str, str]]) -> list[int]:
    """The prompt's token ids, as the processor renders a chat request."""
    ids = tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]
