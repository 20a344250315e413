"""No request or client can break the engine server.

Out-of-range values are rejected at the API with the offending ``param``; a request that still fails inside the
engine fails alone (the engine loop, its other requests and /health survive); disconnecting clients cancel their
work without tracebacks; hostile HTTP input (deep JSON, wrong types, slow or half-open connections, a full
queue) gets a one-line 4xx/503 and never a 500 or a held connection.
"""
import asyncio
import json
import logging
import socket
import time

import pytest
import requests

from foundry_sglang.engine import LLM, AsyncLLMEngine, EngineArgs, SamplingParams
from foundry_sglang.engine.server import ServerLimits, ServerThread

ARGS = EngineArgs(model="builtin:tiny", max_model_len=256, max_num_seqs=4)
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine(ARGS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    srv = ServerThread(engine, limits=ServerLimits(header_timeout=1.0, body_timeout=1.0))
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def reference():
    with LLM(ARGS) as llm:
        return llm.generate("reference", SamplingParams(**GREEDY))[0].text


def completion(url, **body):
    r = requests.post(url + "/v1/completions", json={"prompt": "reference", **GREEDY, **body}, timeout=60)
    return r


def assert_serving(url, reference):
    assert requests.get(url + "/health", timeout=10).status_code == 200
    r = completion(url)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == reference


def error_of(r):
    err = r.json()["error"]
    assert "\n" not in err["message"]
    return err


# -- item 1: ranges at the API, isolation in the engine ------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("seed", 2 ** 63), ("seed", -1), ("top_k", 2 ** 63), ("top_k", 0), ("max_tokens", 2 ** 63),
    ("temperature", 1e400), ("top_p", float("nan")), ("stop_token_ids", [2 ** 63]), ("stop_token_ids", [-1]),
])
def test_out_of_range_values_are_400_with_param_and_engine_survives(server, reference, field, value):
    r = requests.post(server + "/v1/completions", timeout=30,
                      data=json.dumps({"prompt": "x", field: value}).encode())
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == field
    assert_serving(server, reference)


def test_a_request_failing_inside_the_engine_fails_alone(engine, server, reference):
    """Poison one request inside the engine loop: it gets a one-line 500, the others finish exactly."""
    real = engine.engine._check_stop

    def check_stop(seq, tok):
        if seq.prompt_ids == engine.engine.encode_prompt("poison"):
            raise RuntimeError("injected failure")
        return real(seq, tok)

    engine.engine._check_stop = check_stop
    try:
        async def burst():
            import aiohttp
            async with aiohttp.ClientSession() as s:
                async def one(prompt, stream=False):
                    body = {"prompt": prompt, **GREEDY, "stream": stream}
                    async with s.post(server + "/v1/completions", json=body) as r:
                        return r.status, await r.text()
                return await asyncio.gather(one("poison"), one("reference"), one("poison", True),
                                            one("reference"))
        results = asyncio.run(burst())
    finally:
        engine.engine._check_stop = real
    (s1, t1), (s2, t2), (s3, t3), (s4, t4) = results
    assert s1 == 500 and "injected failure" in json.loads(t1)["error"]["message"]
    assert json.loads(t1)["error"]["scope"] == "request"     # the request's own failure, for a router
    assert s3 == 200 and '"error"' in t3 and "injected failure" in t3 and "[DONE]" not in t3
    assert '"scope": "request"' in t3
    for status, text in ((s2, t2), (s4, t4)):
        assert status == 200 and json.loads(text)["choices"][0]["text"] == reference
    assert engine.error is None
    assert_serving(server, reference)


def test_llm_engine_isolates_a_failing_sampler_row():
    """A row whose sampling fails (an impossible seed forced past validation) finishes with reason 'error';
    the rows batched with it are unaffected."""
    with LLM(ARGS) as llm:
        eng = llm.engine
        good = eng.add_request("reference", SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True))
        bad = eng.add_request("reference", SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True))
        bad.seed = 2 ** 64        # overflows int64 inside the batched sampler
        outs = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
        assert outs[bad.request_id].finish_reason == "error" and outs[bad.request_id].error
        assert outs[good.request_id].finish_reason == "length" and outs[good.request_id].num_output_tokens == 8
        alone = llm.generate("reference", SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True))[0]
        assert alone.token_ids == outs[good.request_id].token_ids


# -- item 5: disconnects ---------------------------------------------------------------------------------------
def _generated(engine):
    return engine.stats()["generation_tokens"]


def _wait_idle(engine, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if st["running"] == 0 and st["waiting"] == 0:
            return
        time.sleep(0.05)
    pytest.fail("the engine kept working for a client that left")


def test_non_streaming_request_of_a_departed_client_is_aborted(engine, server):
    _wait_idle(engine)
    before = _generated(engine)
    aborted = engine.stats().get("requests_aborted", 0)
    body = json.dumps({"prompt": "bye", "max_tokens": 240, "temperature": 0, "ignore_eos": True}).encode()
    host, port = server.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30  # leave only once the engine works on it (a loaded machine is slow)
        while _generated(engine) == before and time.monotonic() < deadline:
            time.sleep(0.01)
    _wait_idle(engine)
    assert engine.stats()["requests_aborted"] == aborted + 1
    assert _generated(engine) - before < 240


def test_mid_stream_disconnect_logs_no_traceback(engine, server, caplog):
    _wait_idle(engine)
    caplog.set_level(logging.DEBUG)
    r = requests.post(server + "/v1/completions", stream=True, timeout=60,
                      json={"prompt": "long", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                            "stream": True})
    next(r.iter_lines())
    r.close()
    host, port = server.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as s:    # leaves in the middle of its body
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        time.sleep(0.1)
    _wait_idle(engine)
    time.sleep(0.3)
    noisy = [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.ERROR]
    assert not noisy, [rec.getMessage() for rec in noisy]


# -- item 6: HTTP input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/completions", {"prompt": "x", "stream_options": "yes"}, "stream_options", "object"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"include_usage": "y"}},
     "stream_options.include_usage", "boolean"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "false"}, "ignore_eos", "boolean"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs",
     "not supported"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo", "not supported"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty", "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}},
     "response_format", "not supported"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 256}, "max_tokens", "context length"),
    ("/v1/completions", {"prompt": "x", "stop": ["ab"] * 100_000}, "stop", "at most"),
    ("/v1/completions", {"prompt": "x", "stop": "s" * 100_000}, "stop", "at most"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": list(range(100_000))}, "stop_token_ids", "at most"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "max_completion_tokens": -1}, "max_completion_tokens", "positive"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ("/v1/completions", {"prompt": "x", "temperature": 500}, "temperature", "[0, 100]"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user"}]},
     "messages[1].content", "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content", "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "content"),
    ("/v1/completions", {"prompt": "x", "model": []}, "model", "must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": {"a": 1}}, "model",
     "must be a string"),
])
def test_bad_fields_are_400_with_a_consistent_param(server, reference, path, body, param, needle):
    r = requests.post(server + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == param and needle in err["message"], err


def test_unused_values_of_unsupported_fields_are_accepted(server):
    r = completion(server, logprobs=None, echo=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                   repetition_penalty=1.0, n=1, best_of=1)
    assert r.status_code == 200, r.text


def test_prompt_plus_max_tokens_within_context_is_accepted_and_default_fits(server):
    r = completion(server, prompt="x", max_tokens=200)
    assert r.status_code == 200, r.text
    r = requests.post(server + "/v1/completions", json={"prompt": "x" * 250, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text     # max_tokens not given: the default is cut to what fits
    assert r.json()["usage"]["total_tokens"] <= 256


def test_deeply_nested_json_and_huge_integers_are_400(server, reference, caplog):
    huge = b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
    for path in ("/v1/completions", "/v1/chat/completions"):
        for raw, needle in ((b"[" * 100_000 + b"]" * 100_000, "nested"), (huge, "more than 4300 digits")):
            r = requests.post(server + path, data=raw, timeout=30)
            assert r.status_code == 400, r.text
            assert needle in error_of(r)["message"]
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert_serving(server, reference)


def test_half_open_and_slow_connections_are_closed(server, reference):
    host, port = server.split("//")[1].split(":")
    socks = []
    for i in range(100):
        s = socket.create_connection((host, int(port)))
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")     # headers never finished
        socks.append(s)
    slow_body = socket.create_connection((host, int(port)))
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    assert_serving(server, reference)        # the server is not blocked meanwhile
    time.sleep(3.0)
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            closed += s.recv(1024) == b""
        except ConnectionResetError:
            closed += 1
        except socket.timeout:
            pass
        s.close()
    assert closed == len(socks)
    slow_body.settimeout(2)
    answer = slow_body.recv(4096)
    slow_body.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert_serving(server, reference)


def test_full_waiting_queue_is_503_with_retry_after(reference):
    eng = AsyncLLMEngine(ARGS)
    srv = ServerThread(eng, limits=ServerLimits(max_queued_requests=2))
    try:
        async def flood():
            import aiohttp
            async with aiohttp.ClientSession() as s:
                async def one():
                    body = {"prompt": "q", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
                    async with s.post(srv.url + "/v1/completions", json=body) as r:
                        return r.status, r.headers.get("Retry-After"), await r.json()
                return await asyncio.gather(*(one() for _ in range(12)))
        results = asyncio.run(flood())
        statuses = sorted(s for s, _, _ in results)
        assert statuses.count(200) >= ARGS.max_num_seqs + 2 and 503 in statuses, statuses
        for status, retry, body in results:
            if status == 503:
                assert retry and int(retry) >= 1 and "queue" in body["error"]["message"]
        assert_serving(srv.url, reference)
    finally:
        srv.stop()
        eng.shutdown()


def test_failed_forward_is_rerun_one_by_one_and_fails_only_the_culprit():
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(ARGS) as llm:
        ref = llm.generate([[1, 2, 3], [4, 5, 6]], sp)
        eng = llm.engine
        real = eng.runner.run

        def run(batch):
            if 252 in batch.input_ids:
                raise RuntimeError("injected forward failure")
            return real(batch)
        eng.runner.run = run
        ids = [eng.add_request(p, sp).request_id for p in ([1, 2, 3], [250, 251, 252], [4, 5, 6])]
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
        assert done[ids[1]].finish_reason == "error" and "injected" in done[ids[1]].error
        assert [done[ids[0]].token_ids, done[ids[2]].token_ids] == [r.token_ids for r in ref]


def test_an_engine_that_keeps_failing_turns_unhealthy_with_503():
    eng = AsyncLLMEngine(ARGS)

    def broken(batch):
        raise RuntimeError("device lost")
    eng.engine.runner.run = broken
    srv = ServerThread(eng)
    try:
        codes = [completion(srv.url, prompt=f"p{i}").status_code for i in range(6)]
        assert codes[0] == 500 and codes[-1] == 503, codes
        h = requests.get(srv.url + "/health", timeout=10)
        assert h.status_code == 503 and "device lost" in error_of(h)["message"]
    finally:
        srv.stop()
        eng.shutdown()
