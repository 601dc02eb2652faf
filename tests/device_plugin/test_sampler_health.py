"""Slot health from the agent's real sampler reading the fake NVML through pynvml: a GPU that is
lost turns its slots Unhealthy in ListAndWatch; MIG instances are advertised as their own units."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.device_plugin.slots import slot_unit
from node_agent.sampler import Sampler, SamplerConfig
from tests.device_plugin.conftest import NODE
from tests.fakes import nvml as fake

MIG = ["3g.40gb", "3g.40gb"]


def machine(lost: bool = False) -> dict:
    return fake.scenario([
        fake.gpu("H100", 0, lost=lost),
        fake.gpu("H100", 1, mig=fake.mig_layout("H100", 1, MIG)),
    ])


@pytest.fixture
def nvml(tmp_path: Path) -> fake.FakeNvml:
    nv = fake.FakeNvml(tmp_path, machine())
    nv.install()
    return nv


@pytest.fixture
def sampler(nvml: fake.FakeNvml) -> Iterator[Sampler]:
    s = Sampler(SamplerConfig(node=NODE, nvml_library=str(nvml.lib_path), interval_s=0.1,
                              rescan_interval_s=0.3, nvml_retry_s=0.1))
    s.start()
    yield s
    s.stop()


def test_lost_gpu_turns_its_slots_unhealthy_mig_units_stay(rig_factory, nvml, sampler):
    whole = fake.gpu_uuid(0)
    migs = [fake.mig_uuid(1, gi, p) for gi, p in enumerate(MIG, start=1)]
    rig = rig_factory(start=False)
    rig.units = sampler  # the agent hands its Sampler over as the unit source
    rig.start_service()
    assert rig.kubelet.wait_registered(10)
    assert rig.kubelet.wait_devices(lambda d: {slot_unit(i) for i in d} == {whole, *migs})

    rig.create_bound("on-mig", migs[1], share=40)
    res = rig.kubelet.admit(rig.kubelet_pod("on-mig"))
    assert res.env["NVIDIA_VISIBLE_DEVICES"] == migs[1]

    nvml.write(machine(lost=True))
    assert rig.kubelet.wait_devices(
        lambda d: {h for i, h in d.items() if slot_unit(i) == whole} == {"Unhealthy"}
        and {h for i, h in d.items() if slot_unit(i) != whole} == {"Healthy"}
    )
    rig.create_bound("on-lost", whole, share=50)
    res = rig.kubelet.admit(rig.kubelet_pod("on-lost"))
    assert not res.admitted and "unhealthy" in res.error
