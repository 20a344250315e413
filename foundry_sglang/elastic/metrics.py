"""Prometheus text exposition of the router's and the controller's counters."""
from __future__ import annotations

from typing import List, Optional

from .controller import PHASES, Controller
from .router import Router


def _line(out: List[str], name: str, value: float, labels: str = "") -> None:
    out.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")


def render(router: Router, controller: Optional[Controller]) -> str:
    out: List[str] = []
    s = router.stats
    for name, kind, help_, value in (
        ("foundry_elastic_requests_total", "counter", "Proxied inference requests.", s.requests),
        ("foundry_elastic_requests_completed_total", "counter", "Requests answered below 500.", s.completed),
        ("foundry_elastic_requests_failed_total", "counter", "Requests the router could not serve.", s.failed),
        ("foundry_elastic_request_retries_total", "counter", "Attempts repeated on another replica.", s.retries),
        ("foundry_elastic_stream_resumes_total", "counter", "Greedy streams resumed on another replica.", s.resumed),
        ("foundry_elastic_requests_queued_total", "counter", "Requests that waited for a generation.", s.queued_total),
        ("foundry_elastic_requests_queued", "gauge", "Requests waiting for a generation now.", s.queued_now),
    ):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        _line(out, name, value)
    out += ["# HELP foundry_elastic_request_seconds End-to-end latency of completed requests.",
            "# TYPE foundry_elastic_request_seconds summary"]
    _line(out, "foundry_elastic_request_seconds_sum", round(s.latency_sum, 6))
    _line(out, "foundry_elastic_request_seconds_count", s.latency_count)
    out += ["# HELP foundry_elastic_inflight_requests In-flight requests per generation.",
            "# TYPE foundry_elastic_inflight_requests gauge"]
    for gen, n in sorted(router.inflight_by_generation().items()):
        _line(out, "foundry_elastic_inflight_requests", n, f'generation="{gen}"')
    if controller is None:
        return "\n".join(out) + "\n"
    active = controller.active
    out += ["# HELP foundry_elastic_generation Id of the generation receiving new requests (0: none).",
            "# TYPE foundry_elastic_generation gauge"]
    _line(out, "foundry_elastic_generation", active.id if active else 0)
    out += ["# HELP foundry_elastic_layout_info Layout of the active generation.",
            "# TYPE foundry_elastic_layout_info gauge"]
    if active:
        L = active.layout
        _line(out, "foundry_elastic_layout_info", 1, f'tp="{L.tp}",ep="{L.ep}",replicas="{L.replicas}"')
    out += ["# HELP foundry_elastic_replica_restarts_total Replicas replaced outside a switch (exited or unhealthy).",
            "# TYPE foundry_elastic_replica_restarts_total counter"]
    _line(out, "foundry_elastic_replica_restarts_total", controller.restarts)
    sb = controller.standby_status()
    for name, kind, help_, value in (
        ("foundry_elastic_standby_workers", "gauge", "Warm standby engines waiting for a layout (not serving).",
         sb["ready"]),
        ("foundry_elastic_standby_target", "gauge", "Standby engines the pool is kept at (when slots are free).",
         sb["target"]),
        ("foundry_elastic_standby_used_total", "counter", "Replicas started from a standby engine.", sb["used"]),
        ("foundry_elastic_standby_fallbacks_total", "counter",
         "Standby engines that could not take a layout (a fresh worker started instead).", sb["fallbacks"]),
    ):
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        _line(out, name, value)
    out += ["# HELP foundry_elastic_reconfiguring 1 while a reconfiguration runs.",
            "# TYPE foundry_elastic_reconfiguring gauge"]
    _line(out, "foundry_elastic_reconfiguring", int(controller.current_job is not None))
    out += ["# HELP foundry_elastic_switches_total Finished reconfigurations by outcome.",
            "# TYPE foundry_elastic_switches_total counter"]
    for outcome, n in sorted(controller.switches.items()):
        _line(out, "foundry_elastic_switches_total", n, f'outcome="{outcome}"')
    out += ["# HELP foundry_elastic_switch_phase_seconds Time spent per reconfiguration phase.",
            "# TYPE foundry_elastic_switch_phase_seconds summary"]
    for phase in PHASES:
        if phase in controller.phase_count:
            _line(out, "foundry_elastic_switch_phase_seconds_sum", round(controller.phase_sum[phase], 6),
                  f'phase="{phase}"')
            _line(out, "foundry_elastic_switch_phase_seconds_count", controller.phase_count[phase],
                  f'phase="{phase}"')
    return "\n".join(out) + "\n"
