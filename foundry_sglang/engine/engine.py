"""The engine: rank 0's scheduling loop, worker ranks, and the sync/async front ends.

``LLMEngine`` is the synchronous core (add requests, ``step()``); ``LLM`` wraps it for scripts and tests;
``AsyncLLMEngine`` runs it on a background thread for the HTTP server, the elastic controller and the benchmark.
With tp*ep > 1 the engine spawns ranks 1..N-1 itself; they run ``worker_main``, receiving each step's batch.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Deque, Dict, List, Optional, Tuple, Union
from typing import Sequence as Seq

import torch.multiprocessing as mp

from foundry_sglang.graphs.router import one_line
from foundry_sglang.proc import RANK_CONTEXT_ENV, exit_with_parent, free_port

from .batch import EXIT, StepBatch, broadcast_batch, receive_batch
from .config import ConfigError, EngineArgs, load_model_config
from .graphs import GraphBackendFactory
from .model_runner import ModelRunner
from .sampling import SamplingParams, sample
from .scheduler import FINISHED, PageAllocator, Scheduler, Sequence
from .tokenizer import load_tokenizer

log = logging.getLogger("foundry_sglang.engine")

Prompt = Union[str, List[int]]


@dataclass
class RequestOutput:
    """One increment of a request: ``delta`` text and ``new_token_ids`` since the last output."""

    request_id: str
    delta: str
    new_token_ids: List[int]
    text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finished: bool = False
    finish_reason: Optional[str] = None   # "stop" | "length" | "abort" | "error"
    token_ids: List[int] = field(default_factory=list)  # all output ids (filled when finished)
    error: Optional[str] = None           # finish_reason "error": what failed (one line)


class RequestFailed(RuntimeError):
    """This request failed inside the engine; the engine and its other requests go on."""


class EngineDead(RuntimeError):
    """The engine loop has stopped (a failure not attributable to one request); the server answers 503."""


#: Consecutive forward failures of single, isolated requests after which the failure is taken to be the
#: engine's own (the loop stops and /health turns 503) rather than a request's.
MAX_ISOLATED_FAILURES = 4
#: A request taking part in this many failed batches is failed itself, so isolation always ends.
MAX_BATCH_FAILURES = 3


def worker_main(args: EngineArgs, rank: int, graph_backend_factory: Optional[GraphBackendFactory] = None) -> None:
    """Entry of ranks > 0: build the same runner and execute every step rank 0 broadcasts."""
    logging.basicConfig(level=logging.WARNING)
    # Rank 0 handles Ctrl-C and SIGTERM and tells the workers to exit after its current step: a SIGTERM sent to
    # the whole process group (a supervisor stopping the server) must not kill this rank inside a collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent(sig=signal.SIGKILL)
    try:
        runner = ModelRunner(args, rank=rank, graph_backend_factory=graph_backend_factory)
    except Exception as exc:  # out of memory, a bad archive, ...: one line here, rank 0 reports the start failed
        log.error("rank %d cannot start: %s", rank, one_line(exc)[:300])
        os._exit(1)   # no teardown: the other ranks may wait in a collective
    group = runner.state.control_group
    try:
        while True:
            batch = receive_batch(group)
            if batch.kind == EXIT:
                break
            runner.run(batch)
    except Exception as exc:  # rank 0 went away (or a collective broke): nothing left to serve
        log.error("rank %d exits: lost the other ranks (%s)", rank, one_line(exc)[:300])
        os._exit(1)   # no teardown: the process group is broken and could hang it
    runner.shutdown()


class LLMEngine:
    """Synchronous engine on rank 0. Not thread-safe: drive it from one thread."""

    def __init__(self, args: EngineArgs, graph_backend=None,
                 graph_backend_factory: Optional[GraphBackendFactory] = None):
        """``graph_backend`` (rank 0's) or ``graph_backend_factory`` (every rank's; default: live capture) decide
        how decode graphs are made; Foundry settings in ``args`` need Foundry's factory
        (``foundry_sglang.builtin.make_graph_backend``)."""
        args.validate()
        if args.foundry.enabled and graph_backend is None and graph_backend_factory is None:
            raise ConfigError("the Foundry settings (--foundry-archive/--foundry-mode) need Foundry's graph backend: "
                              "start python -m foundry_sglang.engine, or pass "
                              "graph_backend_factory=foundry_sglang.builtin.make_graph_backend")
        args = replace(args)
        if args.world_size > 1 and args.dist_port is None:
            args.dist_port = free_port()
        self.args = args
        self.model_config = load_model_config(args.model)
        self.tokenizer = load_tokenizer(args.model, args.tokenizer, self.model_config.eos_token_id)
        self.served_model_name = args.served_model_name or args.model
        self.workers: List[mp.Process] = []
        if args.world_size > 1:
            # A standby engine has a forkserver with torch imported already (engine/standby.py).
            ctx = mp.get_context(os.environ.get(RANK_CONTEXT_ENV) or "spawn")
            for rank in range(1, args.world_size):
                p = ctx.Process(target=worker_main, args=(args, rank, graph_backend_factory), daemon=True,
                                name=f"engine-rank{rank}")
                p.start()
                self.workers.append(p)
        try:
            self.runner = ModelRunner(args, rank=0, graph_backend=graph_backend,
                                      graph_backend_factory=graph_backend_factory)
        except BaseException:
            self._stop_workers(timeout=1.0)
            raise
        self.allocator = PageAllocator(self.runner.num_kv_pages, args.page_size)
        self.max_model_len = min(self.runner.max_model_len, self.allocator.usable * args.page_size)
        self.scheduler = Scheduler(self.allocator, args.max_num_seqs,
                                   max(args.max_num_batched_tokens, self.max_model_len))
        self.seqs: Dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "steps_prefill": 0, "steps_decode": 0,
                         "requests_aborted": 0, "requests_failed": 0}
        self._isolated_failures = 0
        self._closed = False
        self.last_logits = None
        self.decode_eager = False  # True: decode without CUDA graphs (checks, benchmarks)
        self.step_times: Deque[Tuple[int, int, float]] = deque(maxlen=10000)  # (kind, batch size, seconds)
        log.info("engine ready: %s, tp=%d ep=%d, %s %s, %d KV pages x %d tokens, context %d, graphs %s",
                 args.model, args.tp, args.ep, self.runner.device, str(self.runner.dtype).replace("torch.", ""),
                 self.runner.num_kv_pages, args.page_size, self.max_model_len, self.runner.graph_bs or "off")

    # -- requests ---------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> List[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not all(isinstance(t, int) and 0 <= t < self.model_config.vocab_size for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {self.model_config.vocab_size})")
        return list(prompt)

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: Optional[str] = None) -> Sequence:
        """Validate and queue a request; ValueError (one line) for bad input."""
        params.validate()
        ids = self.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context length is {self.max_model_len}")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"duplicate request id {rid!r}")
        seq = Sequence(rid, ids, params, params.resolved_seed())
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        self.counters["prompt_tokens"] += len(ids)
        return seq

    def abort(self, request_id: str) -> Optional[RequestOutput]:
        seq = self.seqs.get(request_id)
        if seq is None or seq.status == FINISHED:
            return None
        self.scheduler.finish(seq, "abort")
        self.counters["requests_aborted"] += 1
        return self._emit(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> List[RequestOutput]:
        """Run one prefill or decode step; returns outputs of the sequences that advanced or failed.

        A failure is the failing request's alone: a sampler row that cannot be sampled, or a stop check that
        raises, finishes that request with reason "error". When the forward itself fails, the batch's requests
        are re-queued and re-run one at a time, so only the one that fails alone is failed."""
        t0 = time.perf_counter()
        seqs, batch = self.scheduler.schedule()
        if batch is None:
            return []
        batch.eager = int(self.decode_eager)
        if self.workers:
            broadcast_batch(batch, self.runner.state.control_group)
        try:
            logits = self.runner.run(batch)
        except Exception as exc:
            if self.workers:
                raise  # the other ranks may be inside a collective: not recoverable here
            return self._isolate(seqs, exc)
        self._isolated_failures = 0
        self.last_logits = logits  # for tests and debugging; valid until the next step
        tokens = self._sample(seqs, logits)
        self.counters["steps_prefill" if batch.kind == 1 else "steps_decode"] += 1
        now = time.monotonic()
        outs = []
        for seq, tok in zip(seqs, tokens):
            if isinstance(tok, Exception):
                outs.append(self._fail(seq, tok))
                continue
            if batch.kind != 1:
                seq.isolate = False  # ran a decode step alone after a failed batch: cleared
            seq.output_ids.append(tok)
            seq.num_cached = seq.num_tokens - 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.counters["generation_tokens"] += 1
            try:
                reason = self._check_stop(seq, tok)
            except Exception as exc:
                outs.append(self._fail(seq, exc))
                continue
            if reason:
                self.scheduler.finish(seq, reason)
            outs.append(self._emit(seq))
        self.step_times.append((batch.kind, len(seqs), time.perf_counter() - t0))
        return outs

    def _sample(self, seqs: List[Sequence], logits) -> List[Union[int, Exception]]:
        """One token per sequence; a row that cannot be sampled gets its exception instead."""
        def run(rows, lg):
            return sample(lg, [s.params.temperature for s in rows], [s.params.top_p for s in rows],
                          [s.params.top_k for s in rows], [s.seed for s in rows],
                          [len(s.output_ids) for s in rows])
        try:
            return run(seqs, logits)
        except Exception as exc:
            if len(seqs) == 1:
                return [exc]
        out: List[Union[int, Exception]] = []
        for i, seq in enumerate(seqs):
            try:
                out += run([seq], logits[i:i + 1])
            except Exception as exc:
                out.append(exc)
        return out

    def _fail(self, seq: Sequence, exc: BaseException) -> RequestOutput:
        """Finish one request with reason "error"; the engine goes on."""
        seq.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        log.warning("request %s failed inside the engine: %s", seq.request_id, seq.error)
        log.debug("request %s failure", seq.request_id, exc_info=exc)
        self.scheduler.finish(seq, "error")
        self.counters["requests_failed"] += 1
        return self._emit(seq)

    def _isolate(self, seqs: List[Sequence], exc: BaseException) -> List[RequestOutput]:
        """The forward failed: fail a request that was alone; otherwise re-queue the batch to run one by one."""
        if len(seqs) == 1:
            self._isolated_failures += 1
            if self._isolated_failures >= MAX_ISOLATED_FAILURES:
                raise EngineDead(f"{MAX_ISOLATED_FAILURES} requests in a row failed alone in the forward; last: "
                                 f"{type(exc).__name__}: {exc}") from exc
            return [self._fail(seqs[0], exc)]
        log.warning("a batch of %d requests failed (%s: %s); re-running them one at a time",
                    len(seqs), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        outs = []
        for seq in seqs:
            seq.batch_failures += 1
            if seq.batch_failures >= MAX_BATCH_FAILURES:
                outs.append(self._fail(seq, exc))
            else:
                self.scheduler.requeue(seq)
        return outs

    def _check_stop(self, seq: Sequence, tok: int) -> Optional[str]:
        p = seq.params
        if not p.ignore_eos and tok in self.tokenizer.stop_token_ids:
            seq.output_ids.pop()  # the stop token is not part of the output text
            seq.text = self.tokenizer.decode(seq.output_ids)
            seq.output_ids.append(tok)
            return "stop"
        if tok in p.stop_token_ids:
            return "stop"
        seq.text = self.tokenizer.decode(seq.output_ids)
        if p.stop:
            start = max(0, seq.sent_chars - max(len(s) for s in p.stop))
            hits = [i for i in (seq.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[:min(hits)]
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _emit(self, seq: Sequence) -> RequestOutput:
        finished = seq.status == FINISHED
        text = seq.text
        visible = len(text)
        if not finished:
            if text.endswith("\ufffd"):
                visible = len(text.rstrip("\ufffd"))
            if seq.params.stop:  # hold back what could be the start of a stop string
                visible = max(seq.sent_chars, visible - (max(len(s) for s in seq.params.stop) - 1))
        delta = text[seq.sent_chars:visible]
        seq.sent_chars = max(seq.sent_chars, visible)
        new_ids = seq.output_ids[seq.sent_tokens:]
        seq.sent_tokens = len(seq.output_ids)
        if finished:
            self.seqs.pop(seq.request_id, None)
        return RequestOutput(seq.request_id, delta, new_ids, text[:seq.sent_chars], len(seq.prompt_ids),
                             len(seq.output_ids), finished, seq.finish_reason,
                             list(seq.output_ids) if finished else [], seq.error)

    def stats(self) -> Dict[str, float]:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_usage": self.allocator.usage(), "num_kv_pages": self.runner.num_kv_pages,
                "preemptions": self.scheduler.num_preemptions, **self.counters}

    # -- shutdown ---------------------------------------------------------------------------------
    def lost_ranks(self, wait: float = 0.0) -> List[str]:
        """The ranks > 0 whose processes have exited, as ``rank N exited with status S``; ``wait``: seconds to
        give a rank that is dying (its sockets close before it can be reaped) to be seen as exited."""
        deadline = time.monotonic() + wait
        for p in self.workers:
            p.join(max(0.0, deadline - time.monotonic()))
        return [f"rank {i} exited with status {p.exitcode}" for i, p in enumerate(self.workers, 1)
                if not p.is_alive()]

    def _stop_workers(self, timeout: float = 10.0) -> None:
        for p in self.workers:
            p.join(timeout)
            if p.is_alive():
                p.terminate()
                p.join(2.0)
        self.workers = []

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.workers and not self.lost_ranks():   # with a rank gone the group is broken (already reported)
            try:
                broadcast_batch(StepBatch(EXIT), self.runner.state.control_group)
            except Exception as e:  # a worker already died; terminate the rest
                log.warning("could not signal workers: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
        self._stop_workers()
        self.runner.shutdown()


class LLM:
    """Synchronous convenience API: ``LLM(EngineArgs(...)).generate(prompts, params)``."""

    def __init__(self, args: Optional[EngineArgs] = None, graph_backend=None,
                 graph_backend_factory: Optional[GraphBackendFactory] = None, **kwargs):
        self.engine = LLMEngine(args or EngineArgs(**kwargs), graph_backend=graph_backend,
                                graph_backend_factory=graph_backend_factory)

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None) -> List[RequestOutput]:
        """Run all prompts together (continuous batching) and return one finished output per prompt."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        params = params or SamplingParams()
        pars = list(params) if isinstance(params, (list, tuple)) else [params] * len(plist)
        ids = [self.engine.add_request(p, sp).request_id for p, sp in zip(plist, pars)]
        done: Dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


class AsyncLLMEngine:
    """Runs an LLMEngine on a background thread; ``generate`` is an async iterator of RequestOutput."""

    def __init__(self, args: Optional[EngineArgs] = None, graph_backend=None, engine: Optional[LLMEngine] = None,
                 graph_backend_factory: Optional[GraphBackendFactory] = None):
        """Build a new LLMEngine from ``args``, or wrap an existing idle ``engine``."""
        self.engine = engine or LLMEngine(args, graph_backend=graph_backend,
                                          graph_backend_factory=graph_backend_factory)
        self.tokenizer = self.engine.tokenizer
        self.served_model_name = self.engine.served_model_name
        self.max_model_len = self.engine.max_model_len
        self._inbox: "queue.Queue" = queue.Queue()
        self._streams: Dict[str, tuple] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._stats: Dict[str, float] = self.engine.stats()
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def _deliver(self, out: RequestOutput) -> None:
        entry = self._streams.get(out.request_id)
        if entry is None:
            return
        loop, q = entry
        if out.finished:
            self._streams.pop(out.request_id, None)
        loop.call_soon_threadsafe(q.put_nowait, out)

    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                block = not eng.has_unfinished()
                try:
                    while True:
                        msg = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
                        block = False
                        self._handle(msg)
                except queue.Empty:
                    pass
                if eng.has_unfinished():
                    for out in eng.step():
                        self._deliver(out)
                self._stats = eng.stats()
        except BaseException as e:  # surface engine failures to every waiting request
            lost = eng.lost_ranks(wait=2.0) if eng.workers else []
            if lost or self._stop.is_set():   # a rank gone (killed, or stopping with the server): one line
                first = str(e).splitlines()[0][:300] if str(e) else ""
                log.error("engine loop stopped: %s (%s: %s)", "; ".join(lost) or "shutting down",
                          type(e).__name__, first)
            else:
                log.exception("engine loop failed")
            self.error = e
            for rid, (loop, q) in list(self._streams.items()):
                loop.call_soon_threadsafe(q.put_nowait, e)
            self._streams.clear()

    def _handle(self, msg) -> None:
        kind, rid, payload = msg
        if kind == "add":
            prompt, params = payload
            try:
                self.engine.add_request(prompt, params, rid)
            except Exception as e:  # bad input (ValueError) or a failure of this request alone
                entry = self._streams.pop(rid, None)
                if entry:
                    entry[0].call_soon_threadsafe(entry[1].put_nowait, e)
        elif kind == "abort":
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(out)

    @property
    def num_requests(self) -> int:
        """Requests accepted and not finished (running or waiting)."""
        return len(self._streams)

    def check_request(self, prompt: Prompt, params: SamplingParams) -> List[int]:
        """Validate up front (raises ValueError) so the server can answer 400 before streaming."""
        params.validate()
        ids = self.engine.encode_prompt(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context length is {self.max_model_len}")
        return ids

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: Optional[str] = None) -> AsyncIterator[RequestOutput]:
        """Yield incremental outputs until the request finishes; ValueError for bad input, RequestFailed when
        the request failed inside the engine, EngineDead when the engine has stopped."""
        if self.error is not None or self._stop.is_set():
            raise EngineDead(f"the engine is not running ({self._error_line()})")
        rid = request_id or f"areq-{next(self._ids)}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", rid, (prompt, params)))
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    if isinstance(item, ValueError):
                        raise item
                    if self.error is item:
                        raise EngineDead(f"the engine failed: {self._error_line()}")
                    raise RequestFailed(f"{type(item).__name__}: {item}")
                if item.finish_reason == "error":
                    finished = True
                    raise RequestFailed(item.error or "the request failed inside the engine")
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def _error_line(self) -> str:
        return "stopped" if self.error is None else one_line(self.error)

    def stats(self) -> Dict[str, float]:
        return dict(self._stats)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
