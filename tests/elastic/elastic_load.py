"""Client load for the elastic tests: concurrent streaming and non-streaming, chat and plain completions,
each answer checked against the greedy reference taken before the switches."""
import asyncio
import threading

import aiohttp
from openai_client import openai_request

PROMPTS = [f"request {i}: the quick brown fox" for i in range(6)]
MAX_TOKENS = 12


async def one_request(session, url, i, stream):
    chat = i % 3 == 0
    prompt = PROMPTS[i % len(PROMPTS)]
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return await openai_request(session, url, body, chat=chat)


class LoadGenerator:
    """Concurrent streaming and non-streaming requests on a thread until stopped."""

    def __init__(self, url, reference, concurrency=4):
        self.url, self.reference, self.concurrency = url, reference, concurrency
        self.ok = 0
        self.failures = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
            async def worker(w):
                i = w
                while not self._stop.is_set():
                    stream = (i // len(PROMPTS)) % 2 == 0
                    text, err = await one_request(s, self.url, i, stream)
                    key = (i % len(PROMPTS), i % 3 == 0, stream)
                    if err:
                        self.failures.append(err)
                    elif text != self.reference[key]:
                        self.failures.append(f"mismatch {key}: {text!r} != {self.reference[key]!r}")
                    else:
                        self.ok += 1
                    i += self.concurrency
            await asyncio.gather(*(worker(w) for w in range(self.concurrency)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(300)


def reference_outputs(url):
    async def main():
        async with aiohttp.ClientSession() as s:
            out = {}
            for i in range(len(PROMPTS) * 3):
                for stream in (False, True):
                    text, err = await one_request(s, url, i, stream)
                    assert err is None, err
                    out[(i % len(PROMPTS), i % 3 == 0, stream)] = text
            return out
    return asyncio.run(main())
