"""Chat rendering beside model loading: the same prompt text and tokens for generation, training and the LLM client."""

from __future__ import annotations


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """Prompt text ready for generation: the chat template when the model has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = "\n\n".join(m["content"] for m in messages)
    return body + "\nAnswer:"


def encode(tokenizer, text: str, **kwargs):
    """Tokenize a rendered prompt; a chat template already holds its special tokens."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not templated, **kwargs)
