"""Fixtures for the node agent's tests: the fake NVML (built from C, loaded into the real pynvml),
agents on loopback ports, and a polling helper for conditions that need a few sampling ticks."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from node_agent.agent import Agent, AgentConfig
from node_agent.sampler import Sampler, SamplerConfig
from tests.fakes import nvml as fake
from tests.fakes.kube_fixtures import fake_kube  # noqa: F401  (re-exported fixture)
from tests.fakes.polling import eventually as wait_until

FAST = {"interval_s": 0.1, "rescan_interval_s": 0.3, "nvml_retry_s": 0.1}


def snapshot_or_none(stub: Any) -> Any:
    """GetSnapshot, or None while the agent answers UNAVAILABLE because it has not sampled yet
    (its first tick can come late on a loaded machine)."""
    import grpc

    from node_agent import telemetry_pb2 as pb

    try:
        return stub.GetSnapshot(pb.SnapshotRequest(), timeout=5)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            return None
        raise


@pytest.fixture
def nvml(tmp_path: Path) -> Iterator[fake.FakeNvml]:
    """A fake machine with one plain H100; tests rewrite the scenario as they need."""
    nv = fake.FakeNvml(tmp_path, fake.scenario([fake.gpu("H100", 0)]))
    nv.install()
    yield nv


@pytest.fixture
def make_sampler(nvml: fake.FakeNvml) -> Iterator[Callable[..., Sampler]]:
    made: list[Sampler] = []

    def make(**kw: Any) -> Sampler:
        cfg = SamplerConfig(**{"node": "node-a", "nvml_library": str(nvml.lib_path), **FAST, **kw})
        s = Sampler(cfg)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def make_agent(nvml: fake.FakeNvml) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(sampler: dict[str, Any] | None = None, **kw: Any) -> Agent:
        scfg = SamplerConfig(
            **{"node": "node-a", "nvml_library": str(nvml.lib_path), **FAST, **(sampler or {})}
        )
        cfg = AgentConfig(
            sampler=scfg,
            **{
                "grpc_listen": "127.0.0.1:0",
                "metrics_listen": "127.0.0.1:0",
                "pod_resources_socket": None,
                "publish_inventory": False,
                **kw,
            },
        )
        a = Agent(cfg)
        made.append(a)
        a.start()
        return a

    yield make
    for a in made:
        a.stop()


def ticks(sampler: Sampler, n: int, gap: float = 0.11) -> None:
    """Run `n` ticks by hand, `gap` apart (GPM needs samples > 100 ms apart)."""
    for i in range(n):
        if i:
            time.sleep(gap)
        sampler.tick()


def wait_readings(sampler: Sampler, min_sequence: int = 3) -> Any:
    """Wait for a snapshot in which every unit that has an activity source shows a value."""

    def ready() -> Any:
        snap = sampler.latest()
        if snap is None or snap.sequence < min_sequence:
            return None
        ok = all(u.sm_active.present for u in snap.units if u.healthy and u.source != "none")
        return snap if ok else None

    return wait_until(ready, what="readings from every unit")
