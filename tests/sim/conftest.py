"""A small scenario (6 GPUs on 2 nodes, MPS and time-slicing, a MIG GPU, 3 services, five
simulated minutes) that runs in about a second per policy."""

from __future__ import annotations

from typing import Any

import pytest

from sim.scenario import Scenario, parse_scenario


def small_raw(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "small",
        "seed": 3,
        "duration_s": 300,
        "step_s": 0.5,
        "telemetry_interval_s": 5,
        "cluster": {
            "slots_per_unit": 4,
            "pools": [
                {"name": "h100", "count": 1, "gpus_per_node": 4, "product": "H100-SXM",
                 "mig_layouts": [[], [], [], ["3g.40gb", "3g.40gb"]]},
                {"name": "h200", "count": 1, "gpus_per_node": 2, "product": "H200",
                 "sharing": "time-slicing"},
            ],
        },
        "services": [
            {"name": "chat", "model": "meta-llama/Llama-3.1-8B-Instruct", "trace": "conv",
             "rate": 0.3, "slo": {"ttft_s": 1.0, "tpot_s": 0.05}},
            {"name": "code", "model": "Qwen/Qwen2.5-7B-Instruct", "trace": "code",
             "rate": 0.2, "offset_s": 600, "slo": {"ttft_s": 1.0, "tpot_s": 0.05}},
            {"name": "big", "model": "Qwen/Qwen2.5-32B-Instruct", "trace": "conv",
             "rate": 0.1, "offset_s": 1200, "slo": {"ttft_s": 2.0, "tpot_s": 0.1}},
        ],
        "extender": {"policy": {"stale_after_s": 20}},
        "extender_by_policy": {"dedicated": {"policy": {"decode_min_share": 1.0}}},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="session")
def small() -> Scenario:
    return parse_scenario(small_raw(), "small")
