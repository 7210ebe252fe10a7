"""Prometheus metrics, in a registry of their own (no process-global state).

Gauges that describe "now" (state, active profile, queue, circuits) are read from the
supervisor at scrape time, so they can never drift. Counters and histograms of things
that happened come from two places: the supervisor's published facts (``Swapped``,
``Loaded``, ``Evicted``, ``LoadFailed``, ``Crashed``: counted as published, never
re-derived from state changes), followed by ``follow_events``, and the proxy (requests,
time to first byte, queue wait, fallback use).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from swapd.core import Crashed, Evicted, Loaded, LoadFailed, State, Supervisor, Swapped

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
           120, 300)


class Metrics:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("swapd_requests", "Inference requests by model, route and "
                                "status", ["model", "route", "status"], registry=r)
        self.first_byte = Histogram("swapd_time_to_first_byte_seconds", "From request to "
                                    "the first byte of the answer", ["model"],
                                    buckets=SECONDS, registry=r)
        self.queue_wait = Histogram("swapd_queue_wait_seconds", "Time requests waited for "
                                    "their model", ["model"], buckets=SECONDS, registry=r)
        self.fallback = Counter("swapd_fallback_requests", "Requests served or refused by "
                                "fallback upstreams", ["upstream", "result"], registry=r)
        self.swaps = Counter("swapd_swaps", "Model swaps by result", ["result"], registry=r)
        self.swap_seconds = Histogram("swapd_swap_duration_seconds", "From stopping "
                                      "models to make room to the new one being ready",
                                      buckets=SECONDS, registry=r)
        self.evictions = Counter("swapd_evictions", "Resident models stopped, by reason "
                                 "(room, ttl, unload, reload, shutdown, oom)", ["reason"],
                                 registry=r)
        self.load_seconds = Histogram("swapd_load_duration_seconds", "From spawn to healthy",
                                      ["profile"], buckets=SECONDS, registry=r)
        self.failures = Counter("swapd_child_failures", "Failed starts, crashes and hangs "
                                "(kind: start_failed, crashed, hung)", ["profile", "kind"],
                                registry=r)
        self.restarts = Counter("swapd_child_restarts", "Starts after a crash or a failed "
                                "start of the same profile", ["profile"], registry=r)
        r.register(_LiveState(supervisor))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def requests_by_model(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    model = sample.labels["model"]
                    counts[model] = counts.get(model, 0) + int(sample.value)
        return counts

    def model_label(self, name: str | None) -> str:
        """Bounded label values: configured names only (clients can send anything)."""
        if not name:
            return "(active)"
        return name if self.supervisor.config.resolve(name) is not None else "(unknown)"

    async def follow_events(self) -> None:
        """Turn the supervisor's published events into counters; runs for swapd's life."""
        sup = self.supervisor
        seen = sup.events[-1].seq if sup.events else 0
        failed: set[str] = set()
        while True:
            await sup.wait_changed()
            for event in [e for e in sup.events if e.seq > seen]:
                seen = event.seq
                if event.kind == "shutdown":
                    return
                if event.kind == "starting" and event.data.get("profile") in failed:
                    self.restarts.labels(str(event.data["profile"])).inc()
                match event.fact:
                    case Loaded(profile, _, load_s):
                        failed.discard(profile)
                        self.load_seconds.labels(profile).observe(load_s)
                    case Swapped(_, _, stop_s, load_s):
                        self.swaps.labels("ok").inc()
                        self.swap_seconds.observe(stop_s + load_s)
                    case Evicted(_, reason):
                        self.evictions.labels(reason).inc()
                    case LoadFailed(profile, _, _, swap):
                        failed.add(profile)
                        self.failures.labels(profile, "start_failed").inc()
                        if swap:
                            self.swaps.labels("failed").inc()
                    case Crashed(profile, _, hung):
                        failed.add(profile)
                        self.failures.labels(profile, "hung" if hung else "crashed").inc()


class _LiveState(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sup = self.supervisor
        state = GaugeMetricFamily("swapd_state", "1 for the supervisor's current state",
                                  labels=["state"])
        for s in State:
            state.add_metric([s.value], 1.0 if sup.state is s else 0.0)
        yield state
        active = GaugeMetricFamily("swapd_active_profile", "1 for the profile that is "
                                   "loaded or loading", labels=["profile"])
        for name in sup.config.profiles:
            active.add_metric([name], 1.0 if sup.active and sup.active.name == name else 0.0)
        yield active
        per_profile = GaugeMetricFamily("swapd_profile_state", "1 for each profile's state "
                                        "(several models may be resident)",
                                        labels=["profile", "state"])
        for name in sup.config.profiles:
            current = sup.profile_state(name)
            for s in State:
                per_profile.add_metric([name, s.value], 1.0 if current is s else 0.0)
        yield per_profile
        gpus = sup.gpu_status()
        planned = GaugeMetricFamily("swapd_gpu_planned_bytes", "Bytes the residency "
                                    "planner counts as used on each GPU", labels=["gpu"])
        measured = GaugeMetricFamily("swapd_gpu_measured_bytes", "Bytes resident models "
                                     "reported allocating on each GPU (buffer lines)",
                                     labels=["gpu"])
        for gpu in gpus:
            planned.add_metric([str(gpu["id"])], gpu["planned"])
            measured.add_metric([str(gpu["id"])], gpu["measured"])
        yield planned
        yield measured
        waiting = GaugeMetricFamily("swapd_queue_depth", "Requests waiting for a model",
                                    labels=["profile"])
        for name, count in sup.waiting_by_profile().items():
            waiting.add_metric([name], count)
        yield waiting
        yield GaugeMetricFamily("swapd_inflight_requests", "Requests holding the running "
                                "model", value=sup.n_inflight)
        circuit = GaugeMetricFamily("swapd_circuit_open", "1 while a profile's circuit is "
                                    "open (0.5 half-open)", labels=["profile"])
        for name, info in sup.circuits().items():
            circuit.add_metric([name], {"open": 1.0, "half_open": 0.5}.get(info["state"], 0))
        yield circuit
        cache = sup.slots.stats
        for key, help_text in (
                ("restores", "Prompt-cache slots restored after a load (warm returns)"),
                ("saves", "Prompt-cache slots saved before a stop"),
                ("bytes_saved", "Bytes of prompt cache written"),
                ("bytes_restored", "Bytes of prompt cache read back"),
                ("tokens_restored", "Prompt tokens restored instead of processed again"),
                ("seconds_saved", "Prompt processing time warm returns avoided"),
                ("skipped", "Slot saves skipped as not worth it"),
                ("rejected", "Restores llama-server rejected"),
                ("evicted", "Saved slots dropped to stay within cache.budget")):
            yield CounterMetricFamily(f"swapd_cache_{key}", help_text, value=cache[key])
        writes = CounterMetricFamily("swapd_state_write_errors", "Failed writes into "
                                     "state_dir (full or read-only disk) by what was "
                                     "written; swapd keeps serving", labels=["what"])
        for what, count in sup.state_writes.counts.items():
            writes.add_metric([what], count)
        yield writes
