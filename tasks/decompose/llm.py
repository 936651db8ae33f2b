"""Chat LLM backends (a local HF causal LM or any OpenAI-compatible endpoint) behind one content-addressed cache."""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from tasks.core.config import LLMConfig, ModelConfig
from tasks.core.storage import cache_root, key_lock, write_json

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
BASE_URL_ENV = "CLEARFLOW_LLM_BASE_URL"


class LLMError(RuntimeError):
    """An LLM call that cannot succeed: one line naming the endpoint and why."""


class ChatBackend(Protocol):
    """What CachedChat needs from a backend."""

    def identity(self) -> dict[str, Any]: ...

    def complete_many(self, batch: list[Messages]) -> list[str]: ...


class _Transient(Exception):
    """A failure worth retrying (429, 5xx), with the server's Retry-After when it gave one."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _retry_after_s(value: str | None) -> float | None:
    """Seconds asked by a Retry-After header (delta-seconds or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(resp: httpx.Response) -> str:
    """The error text a server sent (OpenAI's error.message when present), kept to one short line."""
    try:
        body = resp.json()
        msg = body.get("error", body) if isinstance(body, dict) else body
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except ValueError:
        msg = resp.text
    return " ".join(str(msg).split())[:300]


def _is_retryable(exc: BaseException) -> bool:
    """Timeouts, connection failures, 429 and 5xx are retried; anything else fails at once."""
    return isinstance(exc, (_Transient, httpx.TransportError))


class OpenAIChat:
    """Any OpenAI-compatible /chat/completions endpoint, with retries on transient failures."""

    kind = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 384,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        retry_after_max_s: float = 120.0,
        concurrency: int = 4,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise LLMError(f"LLM base_url {base_url!r} is not an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model = base_url.rstrip("/"), model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.timeout_s, self.attempts = timeout_s, max_retries + 1
        self.backoff_s, self.backoff_max_s, self.retry_after_max_s = backoff_s, backoff_max_s, retry_after_max_s
        self.concurrency = max(1, concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers)

    def identity(self) -> dict[str, Any]:
        """What makes two replies comparable: endpoint, model and sampling settings (never the key)."""
        return {"kind": self.kind, "base_url": self.base_url, "model": self.model,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _wait(self, state: RetryCallState) -> float:
        """Honour the server's Retry-After (capped); otherwise exponential backoff with jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_after_max_s)
        return wait_random_exponential(multiplier=self.backoff_s, max=self.backoff_max_s)(state)

    def _post_once(self, messages: Messages) -> str:
        """One request: the reply text, a _Transient to retry, or an LLMError that retrying cannot fix."""
        payload = {"model": self.model, "messages": messages,
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        resp = self.client.post(self.url, json=payload)
        if resp.status_code == 429 or resp.status_code >= 500:
            reason = f"HTTP {resp.status_code} {resp.reason_phrase}".strip()
            raise _Transient(reason, _retry_after_s(resp.headers.get("Retry-After")))
        if resp.status_code >= 400:
            raise LLMError(f"LLM endpoint {self.url} refused the request: HTTP {resp.status_code}"
                           f" {resp.reason_phrase}: {_server_message(resp)}")
        return self._content(resp)

    def _content(self, resp: httpx.Response) -> str:
        """choices[0].message.content of a reply, or an LLMError naming the URL when it is not that shape."""
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"LLM endpoint {self.url} sent a malformed reply (expected JSON with"
                           f" choices[0].message.content): {resp.text[:200]!r}") from exc
        return content or ""

    def complete(self, messages: Messages) -> str:
        """The reply to one conversation, retrying transient failures, else one clear LLMError."""
        retrying = Retrying(stop=stop_after_attempt(self.attempts), wait=self._wait,
                            retry=retry_if_exception(_is_retryable), reraise=True)
        try:
            return retrying(self._post_once, messages)
        except httpx.TimeoutException as exc:
            raise LLMError(f"LLM endpoint {self.url} timed out after {self.timeout_s:g} s"
                           f" ({self.attempts} attempts)") from exc
        except (_Transient, httpx.TransportError) as exc:
            why = str(exc) if isinstance(exc, _Transient) else f"{type(exc).__name__}: {exc}"
            raise LLMError(f"LLM endpoint {self.url} failed after {self.attempts} attempts: {why}") from exc

    def complete_many(self, batch: list[Messages]) -> list[str]:
        """Replies in input order, a few requests in flight at once (the endpoint batches them)."""
        if self.concurrency == 1 or len(batch) <= 1:
            return [self.complete(m) for m in batch]
        with ThreadPoolExecutor(min(self.concurrency, len(batch))) as pool:
            return list(pool.map(self.complete, batch))

    def close(self) -> None:
        self.client.close()


class LocalChat:
    """A Hugging Face causal LM on this machine, loaded once on first use, generating in left-padded batches."""

    kind = "local"

    def __init__(
        self,
        model_cfg: ModelConfig,
        name: str | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 384,
        batch_size: int = 8,
        seed: int = 0,
    ):
        if name and name != model_cfg.name:  # another model than the run's: the run's revision is not its own
            model_cfg = model_cfg.model_copy(update={"name": name, "revision": None})
        self.model_cfg, self.temperature, self.max_new_tokens = model_cfg, temperature, max_new_tokens
        self.batch_size, self.seed = max(1, batch_size), seed
        self._model = self._tok = None

    def identity(self) -> dict[str, Any]:
        """What makes two replies comparable: the model, its revision and dtype, and sampling settings."""
        c = self.model_cfg
        ident = {"kind": self.kind, "model": c.name, "revision": c.revision, "dtype": c.dtype,
                 "temperature": self.temperature, "max_tokens": self.max_new_tokens}
        return ident | ({"seed": self.seed} if self.temperature > 0 else {})

    def _load(self) -> None:
        """Load tokenizer and model once (a fully cached run never pays for it)."""
        if self._model is None:
            from tasks.core.models import load_model, load_tokenizer

            self._tok, self._model = load_tokenizer(self.model_cfg), load_model(self.model_cfg)

    def complete(self, messages: Messages) -> str:
        return self.complete_many([messages])[0]

    def complete_many(self, batch: list[Messages]) -> list[str]:
        """Replies in input order; prompts of similar length share a batch so little padding is wasted."""
        from tasks.core.chat import render

        self._load()
        prompts = [render(self._tok, m) for m in batch]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, text in zip(idx, self._generate([prompts[i] for i in idx])):
                out[i] = text
        return out

    def _generate(self, prompts: list[str]) -> list[str]:
        """Only the new text of each prompt: greedy at temperature 0, else seeded sampling."""
        import torch

        from tasks.core.chat import encode

        self._tok.padding_side = "left"  # new tokens must follow each prompt directly
        enc = encode(self._tok, prompts, padding=True, return_tensors="pt").to(self._model.device)
        sampling = {"do_sample": False}
        if self.temperature > 0:
            torch.manual_seed(self.seed)
            sampling = {"do_sample": True, "temperature": self.temperature}
        with torch.inference_mode():
            generated = self._model.generate(**enc, max_new_tokens=self.max_new_tokens,
                                             pad_token_id=self._tok.pad_token_id, **sampling)
        width = enc["input_ids"].shape[1]
        return [self._tok.decode(row[width:], skip_special_tokens=True).strip() for row in generated]


class CachedChat:
    """Content-addressed reply cache in front of a backend: the same request never reaches the model twice."""

    def __init__(self, backend: ChatBackend, cache_dir: Path | str | None = None):
        self.backend = backend
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "llm"
        self.hits = self.misses = 0

    def key(self, messages: Messages) -> str:
        """sha256 of the backend's identity and the conversation."""
        blob = json.dumps({"backend": self.backend.identity(), "messages": messages}, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _lookup(self, key: str) -> str | None:
        """A cached reply, or None when absent or unreadable (then it is asked again and rewritten)."""
        path = self._path(key)
        if not path.exists():
            return None
        try:
            reply = json.loads(path.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("llm cache: unreadable entry %s, asking again", path)
            return None
        return reply if isinstance(reply, str) else None

    def complete(self, messages: Messages) -> str:
        return self.complete_many([messages])[0]

    def complete_many(self, batch: list[Messages]) -> list[str]:
        """Replies in input order: cached ones read, the rest asked of the backend in one batch and stored."""
        keys = [self.key(m) for m in batch]
        out = [self._lookup(k) for k in keys]
        todo = [i for i, r in enumerate(out) if r is None]
        if todo:
            with key_lock(self._lock_path([keys[i] for i in todo]), "llm cache"):
                for i in todo:  # another process may have answered them while this one waited
                    out[i] = self._lookup(keys[i])
                todo = [i for i in todo if out[i] is None]
                self._ask(batch, keys, todo, out)
        self.hits += len(batch) - len(todo)
        self.misses += len(todo)
        return out  # type: ignore[return-value]

    def _lock_path(self, keys: list[str]) -> Path:
        """One lock per set of missing replies: two runs asking the same batch share it, others do not wait."""
        digest = hashlib.sha256("\n".join(sorted(keys)).encode("ascii")).hexdigest()
        return self.cache_dir / ".locks" / f"{digest}.lock"

    def _ask(self, batch: list[Messages], keys: list[str], todo: list[int], out: list[str | None]) -> None:
        """Ask the backend for the `todo` replies in one batch and store each."""
        if not todo:
            return
        replies = self.backend.complete_many([batch[i] for i in todo])
        for i, reply in zip(todo, replies):
            record = {"backend": self.backend.identity(), "messages": batch[i], "reply": reply}
            write_json(record, self._path(keys[i]))
            out[i] = reply

    def summary(self) -> str:
        """One phrase for a stage's summary line."""
        return f"llm: {self.misses} calls, {self.hits} cached"


def api_key(llm: LLMConfig) -> str | None:
    """The endpoint's API key: from the Prefect Secret block named in the config, else from the environment
    variable it names (or none). Read here, at the call, so the key lives in no config, parameter or manifest."""
    if llm.api_key_block:
        from prefect.blocks.system import Secret  # only when a block is asked for: Prefect is the orchestrator's

        try:
            return str(Secret.load(llm.api_key_block).get())
        except ValueError as err:  # Prefect's "Unable to find block document named ..."
            raise LLMError(f"decompose.llm.api_key_block {llm.api_key_block!r}: {err}") from None
    return os.environ.get(llm.api_key_env)


def make_chat(llm: LLMConfig, model: ModelConfig, seed: int, cache_dir: Path | str | None = None) -> CachedChat:
    """The configured chat backend behind the reply cache; everything it depends on is an argument."""
    if llm.backend == "local":
        backend: ChatBackend = LocalChat(model, llm.model, llm.temperature, llm.max_new_tokens,
                                         batch_size=llm.batch_size, seed=seed)
        return CachedChat(backend, cache_dir)
    base_url = llm.base_url or os.environ.get(BASE_URL_ENV)
    if not base_url:
        raise LLMError(f"no base_url: set decompose.llm.base_url or {BASE_URL_ENV}")
    if not llm.model:
        raise LLMError(f"no model for the endpoint {base_url}: set decompose.llm.model to the served model's name")
    backend = OpenAIChat(base_url, llm.model, api_key(llm), llm.temperature,
                         llm.max_new_tokens, llm.timeout_s, llm.max_retries)
    return CachedChat(backend, cache_dir)
