"""Router and controller logic against in-process test doubles (no Ray, no engine processes).

``FakeEngine`` is a TEST DOUBLE of an engine server: it answers /health and the two completion routes with a
deterministic text derived from the prompt (streamed one SSE event per character), and can be killed
mid-stream. ``FakeBackend`` hands the controller replicas backed by FakeEngines. The end-to-end behaviour with
the real built-in engine on a real Ray cluster is in test_elastic_ray.py.
"""
import asyncio
import json
from typing import List, Optional

import aiohttp
import pytest
from aiohttp import web
from openai_client import openai_request

from foundry_sglang.elastic.api import build_app
from foundry_sglang.elastic.backends import ReplicaHandle, SlotsUnavailable
from foundry_sglang.elastic.controller import Controller, ControllerConfig, Job
from foundry_sglang.elastic.layout import Layout, LayoutError, ModelShape
from foundry_sglang.elastic.router import Router, RouteSet, Upstream


def answer(prompt: str) -> str:
    return prompt[::-1] + "!"


class FakeEngine:
    """TEST DOUBLE of an engine server."""

    def __init__(self, delay: float = 0.01, healthy_after: float = 0.0, fail_start: bool = False):
        self.delay, self.healthy_after, self.fail_start = delay, healthy_after, fail_start
        self.runner: Optional[web.AppRunner] = None
        self.url = None
        self.dead = False
        self.served = 0
        self._t0 = 0.0

    async def _health(self, request):
        ok = asyncio.get_running_loop().time() - self._t0 >= self.healthy_after
        return web.json_response({"ok": ok}, status=200 if ok else 503)

    async def _complete(self, request):
        body = await request.json()
        text = answer(body.get("prompt") or body["messages"][-1]["content"])
        if not body.get("stream"):
            await asyncio.sleep(self.delay * len(text))
            self.served += 1
            return web.json_response({"choices": [{"text": text, "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for ch in text:
            await asyncio.sleep(self.delay)
            if self.dead:
                request.transport.close()
                return resp
            await resp.write(f"data: {json.dumps({'choices': [{'text': ch}]})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        self.served += 1
        return resp

    async def start(self) -> str:
        if self.fail_start:
            raise RuntimeError("fake engine refused to start")
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/chat/completions", self._complete)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self._t0 = asyncio.get_running_loop().time()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self.url

    async def kill(self) -> None:
        self.dead = True
        if self.runner:
            await self.runner.cleanup()
            self.runner = None

    async def stop(self) -> None:
        await self.kill()


class FakeReplica(ReplicaHandle):
    def __init__(self, index, engine: FakeEngine, backend, slots):
        self.index, self.engine, self.backend, self.slots = index, engine, backend, slots

    async def start(self):
        self.url = await self.engine.start()
        self.pid = 0
        return self.url

    async def returncode(self):
        return 1 if self.engine.dead else None

    async def stop(self):
        await self.engine.stop()
        self.backend.free += len(self.slots)
        self.slots = []


class FakeBackend:
    name = "fake"

    def __init__(self, slots: int):
        self.free = slots
        self.engines: List[FakeEngine] = []
        self.fail_next = False
        self.healthy_after = 0.0

    async def allocate(self, gen_id, layout: Layout, spec_for):
        if layout.slots > self.free:
            raise SlotsUnavailable(f"need {layout.slots}, {self.free} free")
        self.free -= layout.slots
        out = []
        for i in range(layout.replicas):
            eng = FakeEngine(fail_start=self.fail_next, healthy_after=self.healthy_after)
            self.engines.append(eng)
            spec_for(i)  # the spec factory must work for every replica
            out.append(FakeReplica(i, eng, self, [0] * layout.slots_per_replica))
        self.fail_next = False
        return out


async def _client_load(url: str, n: int, stream_every: int = 2) -> List[str]:
    """Fire n concurrent requests (mixed streaming and not); return the texts (or raise)."""
    async with aiohttp.ClientSession() as s:
        async def one(i):
            prompt = f"prompt number {i}"
            body = {"prompt": prompt, "stream": i % stream_every == 0, "temperature": 0}
            text, error = await openai_request(s, url, body)
            assert error is None, error
            return text, prompt
        results = await asyncio.gather(*(one(i) for i in range(n)))
    for text, prompt in results:
        assert text == answer(prompt)
    return [t for t, _ in results]


async def _serve(controller, router, token=None):
    runner = web.AppRunner(build_app(controller, router, token))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


# ------------------------------------------------------------------------------------------ router
def test_router_queues_in_gap_and_retries_refused_and_resumes_streams():
    async def main():
        router = Router(queue_timeout=10)
        good, doomed = FakeEngine(delay=0.005), FakeEngine(delay=0.02)
        await good.start()
        await doomed.start()
        refused = Upstream("http://127.0.0.1:9", 1)  # nothing listens on the discard port
        router.set_active(RouteSet(1, [refused, Upstream(doomed.url, 1)]))
        ctl = type("C", (), {"status": lambda self: {"state": "serving", "generation": 1, "layout": None},
                              "config": type("K", (), {"model": "m"})()})()
        runner, url = await _serve(ctl, router)
        try:
            load = asyncio.ensure_future(_client_load(url, 12))
            await asyncio.sleep(0.15)
            await doomed.kill()                       # mid-stream death
            router.set_active(None)                   # gap: requests queue
            await asyncio.sleep(0.3)
            router.set_active(RouteSet(2, [Upstream(good.url, 2)]))
            await load
            assert router.stats.failed == 0 and router.stats.retries > 0
            async with aiohttp.ClientSession() as s:   # malformed JSON -> 400, one line
                async with s.post(url + "/v1/completions", data=b"{nope") as r:
                    assert r.status == 400 and "malformed JSON" in (await r.json())["error"]["message"]
            router.set_active(None)
            router.queue_timeout = 0.3
            async with aiohttp.ClientSession() as s:
                async with s.post(url + "/v1/completions", json={"prompt": "x"}) as r:
                    assert r.status == 503 and "reconfiguration gap" in (await r.json())["error"]["message"]
        finally:
            await runner.cleanup()
            await router.close()
            await good.stop()
    run(main())


# -------------------------------------------------------------------------------------- controller
def _controller(slots=2, layout=Layout(1, 1, 2), shape=ModelShape(4, 2, 0)):
    backend = FakeBackend(slots)
    router = Router(queue_timeout=20)
    cfg = ControllerConfig(model="builtin:tiny", slots=slots, layout=layout, health_interval=0.02,
                           start_timeout=5, monitor_interval=0.1)
    return Controller(cfg, backend, router, shape), backend, router


async def _wait_job(controller, job):
    while job.state == "running":
        await asyncio.sleep(0.02)
    return job


STEPS_2_SLOTS = [({"replicas": 1}, "scale"), ({"tp": 2}, "gap"), ({"tp": 1}, "gap"), ({"replicas": 2}, "scale"),
                 ({"tp": 2, "replicas": 1}, "gap")]
STEPS_3_SLOTS = [({"tp": 2, "replicas": 1}, "shrink"), ({"tp": 1}, "overlap"), ({"replicas": 3}, "scale"),
                 ({"tp": 2, "replicas": 1}, "shrink"), ({"tp": 1, "replicas": 2}, "gap")]


@pytest.mark.parametrize("slots,steps", [(2, STEPS_2_SLOTS), (3, STEPS_3_SLOTS)])
def test_controller_switches_under_load_with_every_strategy(slots, steps):
    async def main():
        controller, backend, router = _controller(slots=slots)
        await controller.start()
        runner, url = await _serve(controller, router)
        try:
            for target, strategy in steps:
                load = asyncio.ensure_future(_client_load(url, 10))
                await asyncio.sleep(0.05)
                job = await _wait_job(controller, controller.submit(target))
                await load
                assert job.state == "succeeded", job.describe()
                assert job.strategy == strategy, (target, job.strategy)
                assert controller.active.layout == job.target
            assert router.stats.failed == 0
            assert backend.free == slots - controller.active.layout.slots  # old generations gave slots back
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/metrics") as r:
                    text = await r.text()
            assert f'foundry_elastic_switches_total{{outcome="succeeded"}} {len(steps)}' in text
            assert 'foundry_elastic_switch_phase_seconds_count{phase="switch"}' in text
            assert "foundry_elastic_requests_failed_total 0" in text
        finally:
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())


@pytest.mark.parametrize("slots,target,kill,expect_strategy", [
    (3, {"tp": 2, "replicas": 1}, True, "shrink"),     # new generation dies while starting
    (2, {"tp": 2, "replicas": 1}, False, "gap"),       # new generation refuses to start after the old stopped
    (3, {"replicas": 3}, True, "scale"),               # an added replica dies while starting
])
def test_controller_rolls_back_when_new_generation_fails(slots, target, kill, expect_strategy):
    async def main():
        controller, backend, router = _controller(slots=slots)
        await controller.start()
        runner, url = await _serve(controller, router)
        try:
            # A replica to kill never turns healthy on its own (a fixed 0.5 s let a loaded CI machine reach health
            # before the kill: the switch then succeeded); engines started after the kill are healthy at once.
            backend.healthy_after = 30.0 if kill else 0.0
            backend.fail_next = not kill
            load = asyncio.ensure_future(_client_load(url, 16))
            started = len(backend.engines)
            job = controller.submit(target)
            if kill:   # kill a replica of the new generation once it runs (and before it is healthy)
                while len(backend.engines) == started or backend.engines[-1].url is None:
                    await asyncio.sleep(0.01)
                await backend.engines[-1].kill()
                backend.healthy_after = 0.0
            await _wait_job(controller, job)
            await load
            assert job.state == "rolled_back" and job.strategy == expect_strategy, job.describe()
            assert controller.active.layout == Layout(1, 1, 2) and len(controller.active.replicas) == 2
            assert len(controller.active.upstreams) == 2
            await _client_load(url, 6)
            assert router.stats.failed == 0
            assert backend.free == slots - 2
        finally:
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())


def test_invalid_and_concurrent_requests_change_nothing():
    async def main():
        controller, backend, router = _controller(shape=ModelShape(4, 2, 8))
        await controller.start()
        runner, url = await _serve(controller, router, token="s3cret")
        auth = {"Authorization": "Bearer s3cret"}
        try:
            async with aiohttp.ClientSession() as s:
                before = (await (await s.get(url + "/status", headers=auth)).json())
                cases = [
                    (b'{"tp": 3}', auth, 400, "needs 6 slots"),
                    (b'{"tp": 4, "replicas": 1}', auth, 400, "needs 4 slots"),
                    (b'{"tp": 2, "ep": 1, "replicas": 1, "pp": 2}', auth, 400, "unknown key"),
                    (b'{"tp": 0}', auth, 400, "positive integer"),
                    (b'{"tp": "2"}', auth, 400, "positive integer"),
                    (b'{"tp": 2', auth, 400, "malformed JSON"),
                    (b'[1]', auth, 400, "JSON object"),
                    (b'{"ep": 2, "tp": 1, "replicas": 1}', {}, 401, "missing bearer token"),
                    (b'{"ep": 2, "tp": 1, "replicas": 1}', {"Authorization": "Bearer no"}, 403, "wrong"),
                ]
                for body, headers, status, needle in cases:
                    async with s.post(url + "/reconfigure", data=body, headers=headers) as r:
                        msg = (await r.json())["error"]["message"]
                        assert r.status == status and needle in msg, (body, r.status, msg)
                        assert "\n" not in msg
                async with s.get(url + "/reconfigure/nope", headers=auth) as r:
                    assert r.status == 404
                async with s.get(url + "/status") as r:
                    assert r.status == 401
                for scheme in ("bearer", "BEARER"):      # the scheme is case-insensitive
                    async with s.get(url + "/status", headers={"Authorization": f"{scheme} s3cret"}) as r:
                        assert r.status == 200, scheme
                after = (await (await s.get(url + "/status", headers=auth)).json())
                assert before["generations"] == after["generations"] and after["switches"]["succeeded"] == 0
                # a second reconfiguration while one runs -> 409
                backend.healthy_after = 0.3
                async with s.post(url + "/reconfigure", json={"tp": 2, "replicas": 1}, headers=auth) as r:
                    assert r.status == 202
                    job_id = (await r.json())["id"]
                async with s.post(url + "/reconfigure", json={"replicas": 1}, headers=auth) as r:
                    assert r.status == 409 and "still running" in (await r.json())["error"]["message"]
                while True:
                    async with s.get(url + f"/reconfigure/{job_id}", headers=auth) as r:
                        job = await r.json()
                    if job["state"] != "running":
                        break
                    await asyncio.sleep(0.05)
                assert job["state"] == "succeeded" and set(job["phases_s"]) >= {"plan", "start_new", "switch"}
        finally:
            await controller.stop()
            await runner.cleanup()
            await router.close()
    run(main())


def test_layout_validation_messages():
    from foundry_sglang.elastic.layout import parse_layout, validate_layout
    shape = ModelShape(4, 2, 8)
    with pytest.raises(LayoutError, match="key/value heads"):
        validate_layout(Layout(4, 1, 1), shape, 8)
    with pytest.raises(LayoutError, match="attention heads"):
        validate_layout(Layout(3, 1, 1), shape, 8)
    with pytest.raises(LayoutError, match="experts"):
        validate_layout(Layout(1, 3, 1), shape, 8)
    with pytest.raises(LayoutError, match="dense"):
        validate_layout(Layout(1, 2, 1), ModelShape(4, 2, 0), 8)
    with pytest.raises(LayoutError, match="each 1 or equal"):
        validate_layout(Layout(2, 4, 1), ModelShape(8, 8, 8), 8)
    validate_layout(Layout(2, 2, 2), shape, 4)   # EP over the TP ranks: max(tp, ep) slots per replica
    assert parse_layout(b'{"replicas": 3}', Layout(2, 1, 1)) == Layout(2, 1, 3)
    with pytest.raises(LayoutError, match="positive"):
        parse_layout({"tp": True})


def test_every_answer_names_the_replica_that_gave_it():
    async def main():
        router = Router(queue_timeout=10)
        engine = FakeEngine()
        await engine.start()
        router.set_active(RouteSet(7, [Upstream(engine.url, 7)]))
        ctl = type("C", (), {"status": lambda self: {"state": "serving", "generation": 7, "layout": None},
                              "config": type("K", (), {"model": "m"})()})()
        runner, url = await _serve(ctl, router)
        want = "7:" + engine.url.rsplit(":", 1)[1]
        try:
            async with aiohttp.ClientSession() as s:
                for stream in (False, True):
                    async with s.post(url + "/v1/completions", json={"prompt": "ab", "stream": stream}) as r:
                        await r.read()
                        assert r.status == 200 and r.headers["X-Foundry-Replica"] == want
        finally:
            await runner.cleanup()
            await router.close()
            await engine.stop()
    run(main())


def test_a_replacement_replica_gets_an_index_and_log_of_its_own():
    """Replica 0 of two fails and is replaced: the new one is replica 2 (its log gen1-...-r2.log), never the index
    (and so the log file) of the replica that still serves."""
    async def main():
        controller, backend, router = _controller(slots=3)
        specs, original = [], controller._spec_for

        def recording(*args, **kwargs):
            make = original(*args, **kwargs)

            def spec(index):
                specs.append(make(index))
                return specs[-1]
            return spec
        controller._spec_for = recording
        controller.config.log_dir = "/tmp/logs"   # names only: nothing is written
        await controller.start()
        try:
            gen = controller.active
            assert [r.index for r in gen.replicas] == [0, 1]
            failed = [gen.replicas[0]]
            await failed[0].engine.kill()
            job = Job(id="repair", target=gen.layout, source=gen.layout)
            assert await controller._repair(job, gen, failed) == 1
            assert sorted(r.index for r in gen.replicas) == [1, 2]
            assert specs[-1].log_path.endswith("-r2.log")
        finally:
            await controller.stop()
            await router.close()
    run(main())
