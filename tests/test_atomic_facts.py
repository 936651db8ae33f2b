"""Atomic-fact rewriting: reply parsing, the OpenAI-compatible endpoint (against a local server), cache, local model."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.decompose.atomic_facts import atomic_units, decompose_context, parse_facts, parse_steps, question_steps
from tasks.core.config import ModelConfig, RunConfig
from tasks.decompose.llm import CachedChat, LLMError, OpenAIChat, make_chat
from tests.llm_server import _Handler

CONTEXTS = [
    ["Paris is the capital of France and Paris lies on the Seine.", "Hello there!", "Berlin is in Germany."],
    ["Mount Everest is the highest mountain."],
]


def _chat(server, tmp_path, **kwargs) -> CachedChat:
    """An endpoint client with millisecond backoff, so retry tests take no real time."""
    opts = {"max_retries": 2, "timeout_s": 5.0, "backoff_s": 0.005, "backoff_max_s": 0.01} | kwargs
    return CachedChat(OpenAIChat(server.base_url, "test-model", **opts), tmp_path / "llm")


def _openai_cfg(tmp_path) -> RunConfig:
    llm = {"backend": "openai", "model": "test-model", "api_key_env": "CLEARFLOW_TEST_KEY", "max_new_tokens": 64}
    return RunConfig.model_validate({"runs_dir": str(tmp_path), "decompose": {"method": "llm", "llm": llm}})


def _assert_nothing_lost(contexts, units) -> None:
    """Every sentence is a source of some unit, and a unit kept as a sentence is that sentence verbatim."""
    assert len(units) == len(contexts)
    for sents, us in zip(contexts, units):
        assert sorted({i for i, _, _ in us}) == list(range(len(sents)))
        assert [i for i, _, _ in us] == sorted(i for i, _, _ in us)
        assert all(t == sents[i] for i, t, kind in us if kind == "sentence")


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[1] A is B.\n[2] C is D.", [(0, "A is B."), (1, "C is D.")]),
        ("Here you go:\n\n1. A is B.\n(2) C is D.\n- [2] C is E.\nThanks",
         [(0, "A is B."), (1, "C is D."), (1, "C is E.")]),
        ("1. [2] C is D.\n2. [2] C is E.", [(1, "C is D."), (1, "C is E.")]),
        ("**[1]** \"A is B.\"\nSentence 2: C is D.\n[1] A is B.", [(0, "A is B."), (1, "C is D.")]),
        ("[0] zero.\n[3] out of range.\n[2] ...\n7. seven.\nno number here", []),
    ],
)
def test_parse_facts_prefixes_prose_and_ranges(reply, expected):
    assert parse_facts(reply, 2) == expected


def test_decompose_context_keeps_sentences_without_facts():
    sents = ["Ann lives in Rome and she works in Milan.", "It rains.", "Bob is tall."]
    units = decompose_context(sents, "[3] Bob is tall.\n[1] Ann lives in Rome.\n[1] Ann works in Milan.")
    assert units == [
        (0, "Ann lives in Rome.", "fact"), (0, "Ann works in Milan.", "fact"),
        (1, "It rains.", "sentence"), (2, "Bob is tall.", "fact"),
    ]
    assert decompose_context(sents, "<|garbage|> ## 12 !!") == [(i, s, "sentence") for i, s in enumerate(sents)]


def test_facts_not_grounded_in_the_context_are_dropped():
    """A small model copying the prompt's example (or inventing) must not put that text into the context."""
    sents = ["Barack Obama was born in Hawaii.", "He served as the 44th president."]
    reply = "[1] Marie Curie was born in Warsaw.\n[2] Barack Obama served as the 44th president.\n[2] The."
    assert decompose_context(sents, reply) == [
        (0, "Barack Obama was born in Hawaii.", "sentence"), (1, "Barack Obama served as the 44th president.", "fact")
    ]


def test_endpoint_facts_cache_and_bearer_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEARFLOW_LLM_BASE_URL", server.base_url)
    monkeypatch.setenv("CLEARFLOW_TEST_KEY", "sk-test-123")
    cfg = _openai_cfg(tmp_path)
    chat = make_chat(cfg.decompose.llm, cfg.model, cfg.seed, tmp_path / "llm")
    units = atomic_units(chat, CONTEXTS + [[]], progress=False)
    assert units[0] == [
        (0, "Paris is the capital of France.", "fact"), (0, "Paris lies on the Seine.", "fact"),
        (1, "Hello there!", "sentence"), (2, "Berlin is in Germany.", "fact"),
    ]
    assert units[1] == [(0, "Mount Everest is the highest mountain.", "fact")]
    assert units[2] == []  # an empty context asks nothing
    assert len(server.requests) == 2
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test-123"}
    assert {(r["path"], r["body"]["model"], r["body"]["max_tokens"]) for r in server.requests} == {
        ("/v1/chat/completions", "test-model", 64)
    }
    assert "sk-test-123" not in "".join(p.read_text() for p in (tmp_path / "llm").rglob("*.json"))

    again = make_chat(cfg.decompose.llm, cfg.model, cfg.seed, tmp_path / "llm")
    assert atomic_units(again, CONTEXTS + [[]], progress=False) == units
    assert len(server.requests) == 2 and (again.hits, again.misses) == (2, 0)


def test_no_key_no_authorization_header_and_no_base_url(server, tmp_path, monkeypatch):
    monkeypatch.delenv("CLEARFLOW_TEST_KEY", raising=False)
    monkeypatch.delenv("CLEARFLOW_LLM_BASE_URL", raising=False)
    with pytest.raises(LLMError, match="no base_url: set decompose.llm.base_url or CLEARFLOW_LLM_BASE_URL"):
        make_chat(_openai_cfg(tmp_path).decompose.llm, ModelConfig(), 0)
    monkeypatch.setenv("CLEARFLOW_LLM_BASE_URL", server.base_url)
    chat = make_chat(_openai_cfg(tmp_path).decompose.llm, ModelConfig(), 0, tmp_path / "llm")
    chat.complete([{"role": "user", "content": "hi"}])
    assert server.requests[0]["auth"] is None


def test_429_honours_retry_after_then_succeeds(server, tmp_path, monkeypatch):
    waits = []  # what the client asked tenacity to sleep between attempts (counted, not timed)
    plain = OpenAIChat._wait

    def recorded(self, state):
        waits.append(plain(self, state))
        return waits[-1]

    monkeypatch.setattr(OpenAIChat, "_wait", recorded)
    server.script, server.retry_after = ["429", "ok"], "0.3"
    units = atomic_units(_chat(server, tmp_path), CONTEXTS[1:], progress=False)
    assert waits == [0.3]  # the server's wait was honoured, not the millisecond backoff
    assert units == [[(0, "Mount Everest is the highest mountain.", "fact")]] and len(server.requests) == 2

    server.script, server.retry_after = ["429", "ok"], "3600"  # capped, not an hour
    _chat(server, tmp_path, retry_after_max_s=0.05).complete([{"role": "user", "content": "x"}])
    assert waits == [0.3, 0.05] and len(server.requests) == 4


def test_persistent_500_names_url_and_attempts_and_caches_nothing(server, tmp_path):
    server.script = ["500"] * 10
    with pytest.raises(LLMError) as err:
        atomic_units(_chat(server, tmp_path, max_retries=2), CONTEXTS[1:], progress=False)
    msg = str(err.value)
    assert f"{server.base_url}/chat/completions failed after 3 attempts: HTTP 500" in msg and "\n" not in msg
    assert len(server.requests) == 3
    assert not list((tmp_path / "llm").rglob("*.json"))


def test_timeout_retries_then_fails(server, tmp_path):
    server.script = ["hang"] * 5
    with pytest.raises(LLMError, match=r"/v1/chat/completions timed out after 0.2 s \(2 attempts\)"):
        _chat(server, tmp_path, timeout_s=0.2, max_retries=1).complete([{"role": "user", "content": "x"}])
    assert len(server.requests) == 2


def test_400_fails_at_once_with_server_message(server, tmp_path):
    server.script = ["400", "ok"]
    with pytest.raises(LLMError, match=r"HTTP 400 Bad Request: model test-model does not exist"):
        _chat(server, tmp_path).complete([{"role": "user", "content": "x"}])
    assert len(server.requests) == 1


def test_broken_json_is_an_error_naming_the_url(server, tmp_path):
    server.script = ["broken"]
    with pytest.raises(LLMError, match=re.escape(f"{server.base_url}/chat/completions sent a malformed reply")):
        _chat(server, tmp_path).complete([{"role": "user", "content": "x"}])


def test_unreachable_endpoint_fails_after_retries(tmp_path):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = closed.server_port
    closed.server_close()  # nothing listens there now
    chat = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.005, backoff_max_s=0.01)
    with pytest.raises(LLMError, match=rf"127.0.0.1:{port}/v1/chat/completions failed after 2 attempts: ConnectError"):
        chat.complete([{"role": "user", "content": "x"}])


def test_garbage_replies_lose_no_sentence(server, tmp_path):
    server.reply_fn = lambda body: "As an AI model I cannot.\n[9] invented.\n(0) zero\n\n"
    units = atomic_units(_chat(server, tmp_path), CONTEXTS, progress=False)
    assert units == [[(i, s, "sentence") for i, s in enumerate(sents)] for sents in CONTEXTS]


def test_question_steps_and_fallback(server, tmp_path):
    def reply(body):
        q = body["messages"][-1]["content"].rsplit("Question: ", 1)[1]
        if "Louvre" not in q:
            return " \n---\n"
        return "Here are the steps:\n1. Which country is the Louvre in?\n2. What is its capital?\n"

    questions = ["What is the capital of the country of the Louvre?", "Who wrote Hamlet?"]
    server.reply_fn = reply
    steps = question_steps(_chat(server, tmp_path), questions)
    assert steps == [["Which country is the Louvre in?", "What is its capital?"], ["Who wrote Hamlet?"]]
    assert parse_steps("Steps:\nWho directed Jaws?\n\nWho is his spouse?\nWho directed Jaws?") == [
        "Who directed Jaws?", "Who is his spouse?"
    ]
    assert parse_steps("Sure, I can help.\nStep 1: Who directed Jaws?\n- Who is his spouse?\nGood luck.") == [
        "Who directed Jaws?", "Who is his spouse?"
    ]


def test_local_chat_tiny_model_end_to_end(tiny_cfg, tmp_path):
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.decompose.method, cfg.decompose.llm.max_new_tokens = "llm", 16
    chat = make_chat(cfg.decompose.llm, cfg.model, cfg.seed, tmp_path / "llm")
    units = atomic_units(chat, CONTEXTS, progress=False)
    _assert_nothing_lost(CONTEXTS, units)
    assert chat.misses == 2 and chat.hits == 0

    again = make_chat(cfg.decompose.llm, cfg.model, cfg.seed, tmp_path / "llm")
    assert atomic_units(again, CONTEXTS, progress=False) == units
    assert (again.hits, again.misses) == (2, 0) and again.backend._model is None  # a full hit loads no model


def test_local_chat_sampling_is_seeded(tiny_cfg):
    """At temperature > 0 the local model samples, and the fixed seed makes it repeatable."""
    from tasks.decompose.llm import LocalChat

    chat = LocalChat(tiny_cfg.model, temperature=0.9, max_new_tokens=8, seed=3)
    batch = [[{"role": "user", "content": "Name a city."}], [{"role": "user", "content": "Say something long."}]]
    first = chat.complete_many(batch)
    assert chat.complete_many(batch) == first and len(first) == 2
    assert chat.identity()["seed"] == 3


class _CountingBackend:
    """A backend that answers by echo and counts what it was asked."""

    def __init__(self):
        self.asked = 0

    def identity(self) -> dict:
        return {"kind": "echo"}

    def complete_many(self, batch):
        self.asked += len(batch)
        return [m[-1]["content"].upper() for m in batch]


_LOCK_HOLDER = """
import json, sys
from pathlib import Path
from filelock import FileLock
from tasks.core.storage import write_json
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.readline()  # the test says when the other process is waiting
for path, record in json.loads(sys.argv[2]):
    write_json(record, Path(path))
lock.release()
"""


def test_a_second_process_asking_the_same_replies_waits_and_then_hits_the_cache(tmp_path):
    """While another process holds the lock of a batch of missing replies, a call for the same batch waits (saying
    so) and then reads the replies that process stored: the backend is never asked."""
    backend = _CountingBackend()
    chat = CachedChat(backend, tmp_path / "llm")
    batch = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    keys = [chat.key(m) for m in batch]
    entries = [(str(chat._path(k)), {"backend": backend.identity(), "messages": m, "reply": f"stored {i}"})
               for i, (k, m) in enumerate(zip(keys, batch))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(chat._lock_path(keys)), json.dumps(entries)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    waiting = threading.Event()

    class _Seen(logging.Handler):
        def emit(self, record):
            if "waiting" in record.getMessage():
                waiting.set()

    logger = logging.getLogger("tasks.core.storage")
    handler, level, disabled = _Seen(), logger.level, logger.disabled
    logger.addHandler(handler), logger.setLevel(logging.INFO)
    logger.disabled = False
    try:
        assert holder.stdout.readline().strip() == "held"
        result: list = []
        caller = threading.Thread(target=lambda: result.append(chat.complete_many(batch)))
        caller.start()
        assert waiting.wait(120), "the second call must wait for the lock"
        holder.communicate("go\n", timeout=60)
        caller.join(120)
    finally:
        logger.removeHandler(handler), logger.setLevel(level)
        logger.disabled = disabled
        holder.kill()
    assert holder.returncode == 0
    assert result == [["stored 0", "stored 1", "stored 2"]]
    assert backend.asked == 0 and (chat.hits, chat.misses) == (3, 0)
    assert chat.complete_many(batch + [[{"role": "user", "content": "new"}]])[-1] == "NEW" and backend.asked == 1
