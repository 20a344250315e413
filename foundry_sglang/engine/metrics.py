"""Prometheus metrics of the server: prometheus_client when installed, else a tiny text formatter."""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Tuple

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "foundry_engine_"


class Metrics:
    """Counters: requests by status, prompt and generated tokens; histogram: time to first token;
    gauges (read from ``stats_fn`` at scrape time): running, waiting, KV-cache usage."""

    def __init__(self, stats_fn: Callable[[], Dict[str, float]]):
        self.stats_fn = stats_fn
        self._lock = threading.Lock()
        self._requests: Dict[str, int] = {}
        self._tokens = {"prompt": 0, "generation": 0}
        self._ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self._ttft_sum = 0.0

    def request_done(self, status: int) -> None:
        with self._lock:
            self._requests[str(status)] = self._requests.get(str(status), 0) + 1

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self._tokens["prompt"] += prompt
            self._tokens["generation"] += generated

    def first_token(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self._ttft_counts[i] += 1
            self._ttft_sum += seconds

    def render(self) -> Tuple[bytes, str]:
        """(body, content type) in the Prometheus text exposition format 0.0.4."""
        stats = self.stats_fn()
        lines: List[str] = []

        def family(name, kind, help_, samples):
            lines.append(f"# HELP {PREFIX}{name} {help_}")
            lines.append(f"# TYPE {PREFIX}{name} {kind}")
            for suffix, labels, value in samples:
                lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
                lines.append(f"{PREFIX}{name}{suffix}{lab} {float(value)!r}")

        with self._lock:
            family("requests_total", "counter", "HTTP generation requests by status code.",
                   [("", {"status": s}, n) for s, n in sorted(self._requests.items())])
            family("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
                   [("", {}, self._tokens["prompt"])])
            family("generation_tokens_total", "counter", "Generated tokens.",
                   [("", {}, self._tokens["generation"])])
            cum, samples = 0, []
            for b, c in zip(list(TTFT_BUCKETS) + ["+Inf"], self._ttft_counts):
                cum += c
                samples.append(("_bucket", {"le": b}, cum))
            samples += [("_sum", {}, self._ttft_sum), ("_count", {}, cum)]
            family("time_to_first_token_seconds", "histogram", "Time from request to first token.", samples)
        family("num_requests_running", "gauge", "Sequences in the running batch.", [("", {}, stats.get("running", 0))])
        family("num_requests_waiting", "gauge", "Sequences waiting for admission.", [("", {}, stats.get("waiting", 0))])
        family("kv_cache_usage", "gauge", "Fraction of KV pages in use.", [("", {}, stats.get("kv_usage", 0.0))])
        return ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4; charset=utf-8"
