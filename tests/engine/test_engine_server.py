"""The OpenAI server end to end on loopback: concurrent streaming and plain requests, bad input, shutdown."""
import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from foundry_sglang.engine import LLM, AsyncLLMEngine, EngineArgs, SamplingParams
from foundry_sglang.engine.server import ServerThread

ARGS = EngineArgs(model="builtin:tiny", max_model_len=256, max_num_seqs=8)
PROMPTS = ["hello", "the quick brown fox", "Foundry restores graphs", "z" * 50, "1 2 3", "chat"]


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = ServerThread(engine)
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def expected():
    with LLM(ARGS) as llm:
        return [o.text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))]


def complete(url, prompt, stream):
    body = {"model": "builtin:tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    r = requests.post(url + "/v1/completions", json=body, stream=stream, timeout=60)
    assert r.status_code == 200, r.text
    if not stream:
        d = r.json()
        assert d["usage"]["completion_tokens"] == 12 and d["choices"][0]["finish_reason"] == "length"
        return d["choices"][0]["text"]
    text, done, reasons = [], False, []
    for line in r.iter_lines():
        if not line:
            continue
        assert line.startswith(b"data: ")
        if line == b"data: [DONE]":
            done = True
            continue
        ch = json.loads(line[6:])["choices"][0]
        text.append(ch["text"])
        reasons.append(ch["finish_reason"])
    assert done and reasons[-1] == "length"
    return "".join(text)


def test_concurrent_streaming_and_plain_requests(server, expected):
    with cf.ThreadPoolExecutor(12) as pool:
        futs = [pool.submit(complete, server, p, i % 2 == 0) for i, p in enumerate(PROMPTS * 2)]
        texts = [f.result(timeout=120) for f in futs]
    assert texts == expected * 2


def test_chat_completions(server):
    msgs = [{"role": "user", "content": "hi"}]
    r = requests.post(server + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0},
                      timeout=60)
    d = r.json()
    assert r.status_code == 200 and d["object"] == "chat.completion"
    assert d["choices"][0]["message"]["role"] == "assistant" and d["usage"]["completion_tokens"] <= 5
    r = requests.post(server + "/v1/chat/completions", stream=True, timeout=60,
                      json={"messages": msgs, "max_tokens": 5, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        d["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == d["usage"]["completion_tokens"]


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x" * 400}, 400, "context length"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "one prompt"),
    ({"prompt": [1, 99999]}, 400, "token ids"),
    ({"messages": "hi"}, 400, "messages"),
])
def test_bad_requests_get_4xx(server, body, status, needle):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = requests.post(server + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "\n" not in err["message"] and err["code"] == status


def test_malformed_json_and_server_keeps_serving(server):
    r = requests.post(server + "/v1/completions", data=b"{not json", timeout=30)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = requests.get(server + "/v1/nothing", timeout=30)
    assert r.status_code == 404
    assert requests.get(server + "/health", timeout=30).text == "ok"
    assert requests.get(server + "/v1/models", timeout=30).json()["data"][0]["id"] == "builtin:tiny"
    assert complete(server, "still alive", False)
    m = requests.get(server + "/metrics", timeout=30).text
    assert re.search(r'foundry_engine_requests_total\{status="400"\} [1-9]', m)
    assert "foundry_engine_time_to_first_token_seconds_count" in m and "foundry_engine_kv_cache_usage" in m


def test_client_disconnect_aborts_request(engine, server):
    """The request is aborted in the engine (counted), long before its 240 tokens are generated."""
    before = engine.stats()
    r = requests.post(server + "/v1/completions", stream=True, timeout=60,
                      json={"prompt": "long", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                            "stream": True})
    next(r.iter_lines())
    r.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        m = requests.get(server + "/metrics", timeout=30).text
        if re.search(r"foundry_engine_num_requests_running 0\.0", m):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the aborted request kept running")
    after = engine.stats()
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["generation_tokens"] - before["generation_tokens"] < 240


def test_main_serves_and_exits_on_sigterm():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "foundry_sglang.engine", "--model", "builtin:tiny", "--port", "0",
                             "--context-length", "128"], cwd=root, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.time() + 90
        while time.time() < deadline and url is None:
            line = proc.stderr.readline()
            m = re.search(r"ready: serving \S+ at (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "no ready line"
        assert complete(url, "hi", True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
