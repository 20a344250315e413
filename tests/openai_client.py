"""A tiny OpenAI-API client for tests and GPU checks: one request, streaming (SSE) or not, completion or chat."""
from __future__ import annotations

import json
from typing import Optional


async def openai_request(session, url: str, body: dict, chat: bool = False,
                         headers: Optional[dict] = None) -> tuple[Optional[str], Optional[str]]:
    """POST to /v1/completions (or /v1/chat/completions when ``chat``); return (text, None) or (None, error).
    ``headers``: a dict that receives the response's headers."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    async with session.post(url + path, json=body) as r:
        if headers is not None:
            headers.update(r.headers)
        if r.status != 200:
            return None, f"HTTP {r.status}: {(await r.text())[:200]}"
        if not body.get("stream"):
            choice = (await r.json())["choices"][0]
            return (choice["message"]["content"] if chat else choice["text"]), None
        text, done = "", False
        async for line in r.content:
            line = line.strip()
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return None, f"in-stream error: {event['error']}"
                for c in event.get("choices", []):
                    text += ((c.get("delta") or {}).get("content") or "") if chat else (c.get("text") or "")
        return (text, None) if done else (None, "stream ended without [DONE]")
