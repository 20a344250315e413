"""Sequences, the KV page allocator and the continuous-batching scheduler (rank 0 only).

Each step is either a prefill of newly admitted sequences (preferred when memory allows) or one decode token for
every running sequence. When a decode step runs out of pages, the most recently admitted sequence is preempted:
its pages are freed and it is re-queued to be prefilled again from its prompt plus the tokens it has produced.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Deque, List, Optional, Tuple

from .batch import DECODE, PREFILL, StepBatch
from .sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: List[int], params: SamplingParams, seed: int):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: List[int] = []
        self.params = params
        self.seed = seed
        self.status = WAITING
        self.pages: List[int] = []
        self.num_cached = 0          # tokens whose KV is in the cache
        self.finish_reason: Optional[str] = None
        self.error: Optional[str] = None   # finish_reason "error": why
        self.isolate = False         # run alone until one decode step succeeds (it was in a failed batch)
        self.batch_failures = 0
        self.arrival = time.monotonic()
        self.first_token_time: Optional[float] = None
        # output text state (kept by the engine)
        self.text = ""
        self.sent_chars = 0
        self.sent_tokens = 0

    @property
    def all_ids(self) -> List[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class PageAllocator:
    """Free list of KV pages; page 0 is reserved for padding rows of decode graphs."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self.free: Deque[int] = deque(range(1, num_pages))

    @property
    def usable(self) -> int:
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> List[int]:
        assert n <= len(self.free)
        return [self.free.popleft() for _ in range(n)]

    def release(self, pages: List[int]) -> None:
        self.free.extend(pages)
        pages.clear()

    def usage(self) -> float:
        return 1.0 - len(self.free) / max(1, self.usable)


class Scheduler:
    def __init__(self, allocator: PageAllocator, max_num_seqs: int, max_num_batched_tokens: int):
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = FINISHED
        seq.finish_reason = reason
        self.allocator.release(seq.pages)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.allocator.release(seq.pages)
        seq.num_cached = 0
        seq.status = WAITING
        self.waiting.appendleft(seq)

    def requeue(self, seq: Sequence) -> None:
        """Put a running sequence of a failed step back at the head of the queue, to be run alone."""
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.release(seq.pages)
        seq.num_cached = 0
        seq.status = WAITING
        seq.isolate = True
        self.waiting.appendleft(seq)

    def schedule(self) -> Tuple[List[Sequence], Optional[StepBatch]]:
        """Pick the next step's sequences and build its batch (None when idle)."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.isolate and batch:
                break
            need = self.allocator.pages_for(seq.num_tokens)
            if tokens + seq.num_tokens > self.max_num_batched_tokens and batch:
                break
            if need > len(self.allocator.free):
                break
            self.waiting.popleft()
            seq.pages = self.allocator.allocate(need)
            seq.status = RUNNING
            batch.append(seq)
            tokens += seq.num_tokens
            if seq.isolate:
                break
        if batch:
            self.running.extend(batch)
            return batch, self._prefill_batch(batch)
        for seq in list(self.running):
            if seq.status != RUNNING:
                continue
            while self.allocator.pages_for(seq.num_tokens) > len(seq.pages):
                if self.allocator.free:
                    seq.pages += self.allocator.allocate(1)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
        decode = [s for s in self.running if s.status == RUNNING]
        suspects = [s for s in decode if s.isolate]
        if suspects:
            decode = suspects[:1]
        if not decode:
            return [], None
        return decode, self._decode_batch(decode)

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.pages[pos // self.allocator.page_size] * self.allocator.page_size + pos % self.allocator.page_size

    def _prefill_batch(self, seqs: List[Sequence]) -> StepBatch:
        b = StepBatch(PREFILL, cu_seqlens=[0])
        for seq in seqs:
            n = seq.num_tokens
            b.input_ids += seq.all_ids
            b.positions += list(range(n))
            b.slot_mapping += [self._slot(seq, p) for p in range(n)]
            b.cu_seqlens.append(b.cu_seqlens[-1] + n)
        return b

    def _decode_batch(self, seqs: List[Sequence]) -> StepBatch:
        b = StepBatch(DECODE)
        ps = self.allocator.page_size
        for seq in seqs:
            pos = seq.num_tokens - 1
            b.input_ids.append(seq.all_ids[-1])
            b.positions.append(pos)
            b.slot_mapping.append(self._slot(seq, pos))
            b.seq_lens.append(pos + 1)
            b.block_tables.append(seq.pages[:-(-(pos + 1) // ps)])
        return b
