"""The control plane recovers on its own, against in-process test doubles.

A replica that is up but failing (500s, /health 503) leaves routing and is replaced; so is one that dies outside
a switch, from the same archive, and the restarts show in /status and /metrics. Stopping the controller during a
switch ends the job. A client that disconnects is never blamed on the replica that served it.
"""
import asyncio
import json
import logging
import socket
import struct

import aiohttp
from aiohttp import web
from openai_client import openai_request
from test_elastic_units import FakeBackend, FakeEngine, _client_load, _serve, answer, run

from foundry_sglang.elastic.controller import Controller, ControllerConfig
from foundry_sglang.elastic.layout import Layout, ModelShape
from foundry_sglang.elastic.router import Router, RouteSet, Upstream


class BrokenEngine(FakeEngine):
    """TEST DOUBLE: an engine that is up but has failed (every request 500, /health 503) once ``broken``."""

    broken = False

    async def _health(self, request):
        if self.broken:
            return web.json_response({"error": {"message": "engine failed"}}, status=503)
        return await super()._health(request)

    async def _complete(self, request):
        if self.broken:
            return web.json_response({"error": {"message": "internal error"}}, status=500)
        return await super()._complete(request)


class SlowDoneEngine(FakeEngine):
    """TEST DOUBLE: keeps the stream open a moment after ``data: [DONE]`` (as a real server may)."""

    async def _complete(self, request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ch in answer(body["prompt"]):
            await resp.write(f"data: {json.dumps({'choices': [{'text': ch}]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        self.served += 1
        await self._after_done(request)
        return resp

    async def _after_done(self, request):
        await asyncio.sleep(0.3)


class BrokenBackend(FakeBackend):
    async def allocate(self, gen_id, layout, spec_for):
        replicas = await super().allocate(gen_id, layout, spec_for)
        for r in replicas:
            r.engine.__class__ = BrokenEngine
        return replicas


class ResetAfterDoneEngine(SlowDoneEngine):
    """TEST DOUBLE: sends the whole stream, ``data: [DONE]`` included, then resets the connection."""

    async def _after_done(self, request):
        await asyncio.sleep(0.05)
        request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                              struct.pack("ii", 1, 0))
        request.transport.abort()     # RST, and the chunked body is never terminated


class ErrorOnceEngine(FakeEngine):
    """TEST DOUBLE: its first stream sends three events, then an in-band error event, then ends (as an engine
    server reports a failure after its headers are out); later streams are complete. ``scope`` marks the error
    (``"request"``: the request's own failure); ``diverge``: later streams answer differently."""

    def __init__(self, scope=None, diverge=False):
        super().__init__(delay=0.002)
        self.scope, self.diverge, self.calls = scope, diverge, 0

    async def _complete(self, request):
        body = await request.json()
        self.calls += 1
        first = self.calls == 1
        text = answer(body["prompt"])
        if self.diverge and not first:
            text = text.upper()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, ch in enumerate(text):
            if first and i == 3:
                err = {"message": "engine failed", "type": "server_error", "code": 500}
                if self.scope:
                    err["scope"] = self.scope
                await resp.write(f"data: {json.dumps({'error': err})}\n\n".encode())
                return resp
            await resp.write(f"data: {json.dumps({'choices': [{'text': ch}]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        self.served += 1
        return resp


def _bare_controller():
    """The least a router's app needs of a controller (the router is driven directly)."""
    return type("C", (), {"status": lambda self: {"state": "serving", "generation": 1, "layout": None},
                          "config": type("K", (), {"model": "m"})()})()


def _events(raw: bytes):
    """The SSE events of a raw stream body, and the text of its completion chunks."""
    events = [e for e in raw.split(b"\n\n") if e]
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events
                   if e.startswith(b"data: {") and b'"choices"' in e)
    return events, text


def _controller(slots=2, layout=Layout(1, 1, 2)):
    backend = BrokenBackend(slots)
    router = Router(queue_timeout=20)
    cfg = ControllerConfig(model="builtin:tiny", slots=slots, layout=layout, health_interval=0.02,
                           start_timeout=5, monitor_interval=0.1)
    return Controller(cfg, backend, router, ModelShape(4, 2, 0)), backend, router


async def _until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def _get(url, path):
    async with aiohttp.ClientSession() as s:
        async with s.get(url + path) as r:
            return r.status, await r.text()


# -- item 2: up but failed ---------------------------------------------------------------------------------
def test_router_retries_a_500_on_another_replica():
    async def main():
        router = Router(queue_timeout=5)
        bad, good = BrokenEngine(), FakeEngine()
        await bad.start()
        await good.start()
        bad.broken = True
        router.set_active(RouteSet(1, [Upstream(bad.url, 1), Upstream(good.url, 1)]))
        runner, url = await _serve(_bare_controller(), router)
        try:
            await _client_load(url, 8)
            assert router.stats.failed == 0 and router.stats.retries > 0
        finally:
            await runner.cleanup()
            await router.close()
            await good.stop()
            await bad.stop()
    run(main())


def test_replica_that_is_up_but_failed_leaves_routing_and_is_replaced():
    async def main():
        controller, backend, router = _controller()
        await controller.start()
        runner, url = await _serve(controller, router)
        try:
            victim = controller.active.replicas[0].engine
            victim.broken = True
            await _client_load(url, 8)       # served by the healthy replica meanwhile
            await _until(lambda: controller.restarts >= 1 and len(controller.active.upstreams) == 2)
            assert victim.runner is None                      # the failed engine was stopped
            assert all(r.engine is not victim for r in controller.active.replicas)
            await _client_load(url, 8)
            assert router.stats.failed == 0
            status, text = await _get(url, "/metrics")
            assert "foundry_elastic_replica_restarts_total 1" in text
            assert controller.status()["restarts"] == 1
            assert backend.free == 0
        finally:
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())


# -- item 3: dead outside a switch -------------------------------------------------------------------------------
def test_the_only_replica_dying_is_replaced_and_requests_wait_for_it():
    async def main():
        controller, backend, router = _controller(slots=1, layout=Layout(1, 1, 1))
        await controller.start()
        runner, url = await _serve(controller, router)
        try:
            await controller.active.replicas[0].engine.kill()
            await _client_load(url, 6)        # queued until the replacement is healthy, then served
            assert controller.restarts == 1 and controller.active.layout == Layout(1, 1, 1)
            assert len(controller.active.replicas) == 1 and router.stats.failed == 0
            status, text = await _get(url, "/health")
            assert status == 200 and json.loads(text)["status"] == "ok"
        finally:
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())


def test_health_is_503_while_no_replica_can_serve_and_reconfigure_same_layout_repairs():
    async def main():
        controller, backend, router = _controller(slots=1, layout=Layout(1, 1, 1))
        controller.config.monitor_interval = 3600       # the monitor stays out of the way
        await controller.start()
        runner, url = await _serve(controller, router)
        try:
            await controller.active.replicas[0].engine.kill()
            status, text = await _get(url, "/health")
            assert status == 503 and json.loads(text)["status"] == "unavailable", text
            job = controller.submit({"replicas": 1})
            while job.state == "running":
                await asyncio.sleep(0.02)
            assert job.state == "succeeded" and job.strategy == "repair", job.describe()
            assert controller.restarts == 1
            await _client_load(url, 4)
            status, text = await _get(url, "/health")
            assert status == 200
        finally:
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())


# -- item 4: stop during a switch ------------------------------------------------------------------------------
def test_stopping_the_controller_during_a_switch_ends_the_job_and_frees_every_slot():
    async def main():
        controller, backend, router = _controller()
        await controller.start()
        backend.healthy_after = 30.0        # the new generation never becomes healthy in this test
        job = controller.submit({"tp": 2, "replicas": 1})
        await _until(lambda: job.phase == "wait_healthy")
        await asyncio.wait_for(controller.stop(), 10)
        assert job.state == "cancelled" and "stopped" in job.error, job.describe()
        assert controller.current_job is None
        assert backend.free == 2 and all(e.runner is None for e in backend.engines)
        await router.close()
    run(main())


# -- item 5: client disconnects ---------------------------------------------------------------------------------
def _raw_stream_then_close(url, prompt, after=b"[DONE]"):
    host, port = url.split("//")[1].split(":")
    body = json.dumps({"prompt": prompt, "stream": True, "temperature": 0}).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    seen = b""
    while after not in seen:
        chunk = s.recv(65536)
        if not chunk:
            break
        seen += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")   # RST on close
    s.close()
    return seen


def _leave_mid_body(url):
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"pro")
        import time
        time.sleep(0.1)


def test_client_leaving_after_done_or_mid_stream_is_not_an_upstream_failure(caplog):
    async def main():
        router = Router(queue_timeout=5)
        eng = SlowDoneEngine(delay=0.01)
        await eng.start()
        up = Upstream(eng.url, 1)
        router.set_active(RouteSet(1, [up]))
        runner, url = await _serve(_bare_controller(), router)
        loop = asyncio.get_running_loop()
        try:
            caplog.set_level(logging.INFO)
            seen = await loop.run_in_executor(None, _raw_stream_then_close, url, "finished")
            assert b"[DONE]" in seen
            await loop.run_in_executor(None, _raw_stream_then_close, url, "a long prompt " * 5, b"data:")
            await loop.run_in_executor(None, _leave_mid_body, url)
            await asyncio.sleep(1.0)
            assert up.available and up.outstanding == 0
            assert router.stats.retries == 0 and router.stats.failed == 0, vars(router.stats)
            assert eng.served <= 2           # never replayed
            async with aiohttp.ClientSession() as s:
                text, err = await openai_request(s, url, {"prompt": "next", "stream": True})
            assert err is None and text == answer("next")
            noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
            assert not noisy, [r.getMessage() for r in noisy]
        finally:
            await runner.cleanup()
            await router.close()
            await eng.stop()
    run(main())


def test_a_stream_that_delivered_done_is_finished_even_if_its_upstream_then_resets(caplog):
    """The upstream sends the whole stream with [DONE] and then resets: the client has its answer, greedy or
    not; nothing is replayed, nothing follows [DONE], no replica is blamed."""
    async def main():
        router = Router(queue_timeout=5)
        engines = [ResetAfterDoneEngine(delay=0.002), ResetAfterDoneEngine(delay=0.002)]
        for e in engines:
            await e.start()
        router.set_active(RouteSet(1, [Upstream(e.url, 1) for e in engines]))
        runner, url = await _serve(_bare_controller(), router)
        try:
            caplog.set_level(logging.INFO, logger="foundry_sglang.elastic.router")
            async with aiohttp.ClientSession() as s:
                for i, temperature in enumerate((0, 0.7, 0, 0.7)):
                    prompt = f"finished stream {i}"
                    async with s.post(url + "/v1/completions",
                                      json={"prompt": prompt, "stream": True, "temperature": temperature}) as r:
                        raw = await r.read()
                    events, text = _events(raw)
                    assert events[-1] == b"data: [DONE]" and raw.count(b"[DONE]") == 1, raw
                    assert b"error" not in raw and text == answer(prompt), raw
            assert sum(e.served for e in engines) == 4               # never replayed
            assert all(u.available and u.failures == 0 for u in router.active.upstreams)
            assert router.stats.retries == 0 and router.stats.failed == 0 and router.stats.completed == 4
            assert not [r for r in caplog.records if r.name.startswith("foundry_sglang")
                        and r.levelno >= logging.INFO], caplog.text
        finally:
            await runner.cleanup()
            await router.close()
            for e in engines:
                await e.stop()
    run(main())


async def _stream_once(engine, prompt="abcdefgh"):
    """One greedy stream through a router whose two upstreams are ``engine``; (raw body, router)."""
    router = Router(queue_timeout=5)
    await engine.start()
    router.set_active(RouteSet(1, [Upstream(engine.url, 1), Upstream(engine.url, 1)]))
    runner, url = await _serve(_bare_controller(), router)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/completions",
                              json={"prompt": prompt, "stream": True, "temperature": 0}) as r:
                return await r.read(), router
    finally:
        await runner.cleanup()
        await router.close()
        await engine.stop()


def test_greedy_resume_after_an_in_band_error_is_exact_or_does_not_happen():
    async def main():
        prompt = "abcdefgh"
        # A replica's error event after t0-t2: resumed elsewhere from t3, the error never reaches the client.
        raw, router = await _stream_once(ErrorOnceEngine(), prompt)
        events, text = _events(raw)
        assert b"error" not in raw and events[-1] == b"data: [DONE]", raw
        assert text == answer(prompt), raw
        assert router.stats.resumed == 1
        # The re-run answers differently: the client keeps t0-t2 and gets an error, never a spliced answer.
        raw, router = await _stream_once(ErrorOnceEngine(diverge=True), prompt)
        events, text = _events(raw)
        assert text == answer(prompt)[:3] and b"[DONE]" not in raw, raw
        assert b"resume not possible" in events[-1], raw
        # The request's own failure (scope "request"): passed on as it is, not retried, nobody blamed.
        engine = ErrorOnceEngine(scope="request")
        raw, router = await _stream_once(engine, prompt)
        events, text = _events(raw)
        assert text == answer(prompt)[:3] and b"engine failed" in events[-1] and b"[DONE]" not in raw, raw
        assert engine.calls == 1 and router.stats.retries == 0
        assert all(u.available and u.failures == 0 for u in router.active.upstreams)
    run(main())


def test_requests_failing_on_their_own_never_take_real_replicas_out_of_routing():
    """Two real engine servers (builtin:tiny) behind the router. Several clients at once send a wrong-typed model
    (a 400 from the engine) and a prompt that fails inside the engine (a 500, or an in-band error when streamed,
    marked as the request's own): both replicas stay routable and the legitimate requests beside them are
    answered exactly, none retried."""
    from foundry_sglang.engine import AsyncLLMEngine, EngineArgs
    from foundry_sglang.engine.server import ServerThread

    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    engine = AsyncLLMEngine(EngineArgs(model="builtin:tiny", max_model_len=256, max_num_seqs=8))
    poison, real = engine.engine.encode_prompt("poison"), engine.engine._check_stop

    def check_stop(seq, tok):
        if seq.prompt_ids == poison:
            raise RuntimeError("injected failure")
        return real(seq, tok)

    engine.engine._check_stop = check_stop
    servers = [ServerThread(engine), ServerThread(engine)]

    async def main():
        router = Router(queue_timeout=20)
        router.set_active(RouteSet(1, [Upstream(srv.url, 1) for srv in servers]))
        runner, url = await _serve(_bare_controller(), router)
        bad_bodies = [{"prompt": "x", "model": []}, {"prompt": "poison", **greedy},
                      {"prompt": "poison", **greedy, "stream": True}]
        try:
            async with aiohttp.ClientSession() as s:
                reference, err = await openai_request(s, url, {"prompt": "legit", **greedy})
                assert err is None, err

                async def bad(i):
                    async with s.post(url + "/v1/completions", json=bad_bodies[i % 3]) as r:
                        return r.status, await r.text()

                results = await asyncio.gather(
                    *(bad(i) for i in range(24)),
                    *(openai_request(s, url, {"prompt": "legit", **greedy, "stream": i % 2 == 0}) for i in range(8)))
            for i, (status, text) in enumerate(results[:24]):
                if i % 3 == 0:
                    assert status == 400 and "model must be a string" in text, text
                elif i % 3 == 1:
                    assert status == 500 and json.loads(text)["error"]["scope"] == "request", text
                else:
                    assert status == 200 and "injected failure" in text and "[DONE]" not in text, text
            assert results[24:] == [(reference, None)] * 8
            assert router.routable() == 2 and all(u.failures == 0 for u in router.active.upstreams)
            assert router.stats.retries == 0
        finally:
            await runner.cleanup()
            await router.close()

    try:
        run(main())
    finally:
        for srv in servers:
            srv.stop()
        engine.shutdown()


# -- item 6 at the router: hostile input, busy replicas -----------------------------------------------------------
class BusyEngine(FakeEngine):
    """TEST DOUBLE: a replica whose waiting queue is full (503 with Retry-After)."""

    async def _complete(self, request):
        self.served += 1
        return web.json_response({"error": {"message": "the server is busy"}}, status=503,
                                 headers={"Retry-After": "3"})


def test_router_deep_json_and_huge_integers_are_400_and_busy_replicas_pass_503_with_retry_after(caplog):
    async def main():
        controller, backend, router = _controller()
        await controller.start()
        runner, url = await _serve(controller, router)
        busy = [BusyEngine(), BusyEngine()]
        try:
            deep = b"[" * 100_000 + b"]" * 100_000
            huge = b'{"prompt": "x", "tp": ' + b"1" * 5000 + b"}"
            async with aiohttp.ClientSession() as s:
                for path in ("/v1/completions", "/reconfigure"):
                    for raw, needle in ((deep, "nested"), (huge, "more than 4300 digits")):
                        async with s.post(url + path, data=raw) as r:
                            assert r.status == 400 and needle in (await r.json())["error"]["message"], path
                assert not [r for r in caplog.records if r.exc_info], caplog.text
                for e in busy:
                    await e.start()
                router.set_active(RouteSet(9, [Upstream(e.url, 9) for e in busy]))
                for stream in (False, True):
                    async with s.post(url + "/v1/completions", json={"prompt": "x", "stream": stream}) as r:
                        assert r.status == 503 and r.headers.get("Retry-After") == "3"
            assert all(e.served == 2 for e in busy)               # each tried once per request
            assert all(u.available for u in router.active.upstreams)   # busy is not down
        finally:
            for e in busy:
                await e.stop()
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())
