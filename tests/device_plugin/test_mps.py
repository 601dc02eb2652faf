"""MPS mode: one supervised control daemon per unit (a stand-in executable at the machine's
edge), the pipe directory handed to containers, restarts reported in metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from node_agent.device_plugin.mps import MpsSupervisor, log_dir, pipe_dir
from tests.device_plugin.conftest import gpu_uuid, wait_for

STAND_IN = Path(__file__).with_name("fake_mps_control.py")


def gauge(uuid: str) -> float | None:
    return REGISTRY.get_sample_value("copack_mps_daemon_up", {"uuid": uuid})


def restarts(uuid: str) -> float:
    return REGISTRY.get_sample_value("copack_mps_daemon_restarts_total", {"uuid": uuid}) or 0.0


def daemon_pid(root: Path, uuid: str) -> int | None:
    try:
        return int((Path(pipe_dir(str(root), uuid)) / "nvidia-cuda-mps-control.pid").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def mps_binary(short_dir: Path):
    """An executable `nvidia-cuda-mps-control` stand-in; kills leftover daemons afterwards."""
    wrapper = short_dir / "nvidia-cuda-mps-control"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STAND_IN}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    yield str(wrapper)
    for pidfile in short_dir.glob("mps/*/pipe/nvidia-cuda-mps-control.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_mps_daemons_run_per_unit_and_are_restarted_when_they_die(rig_factory, mps_binary):
    rig = rig_factory(n_units=2, mps=True, mps_control_binary=mps_binary)
    mps_root = Path(rig.config.mps_root)
    units = [gpu_uuid(0), gpu_uuid(1)]
    assert wait_for(lambda: all(gauge(u) == 1 for u in units))
    for u in units:
        started = (Path(log_dir(str(mps_root), u)) / "control.log").read_text()
        assert f"CUDA_VISIBLE_DEVICES={u}" in started

    rig.create_bound("mps-pod", units[1], share=30)
    res = rig.kubelet.admit(rig.kubelet_pod("mps-pod"))
    c = res.containers["vllm"]
    assert c.envs["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/nvidia-mps"
    assert c.envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert c.mounts == [("/tmp/nvidia-mps", pipe_dir(str(mps_root), units[1]), False)]

    victim = units[0]
    before, old_pid = restarts(victim), daemon_pid(mps_root, victim)
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)  # the daemon dies under the agent
    assert wait_for(lambda: restarts(victim) == before + 1 and gauge(victim) == 1)
    new_pid = daemon_pid(mps_root, victim)
    assert new_pid is not None and new_pid != old_pid
    assert rig.service.mps.is_up(victim)

    rig.stop_service()  # daemons are told to quit
    assert all(gauge(u) == 0 for u in units)
    assert all(daemon_pid(mps_root, u) is None for u in units)


def test_missing_mps_binary_is_reported_down_not_fatal(short_dir):
    sup = MpsSupervisor(str(short_dir / "mps"), str(short_dir / "no-such-binary"),
                        lambda: ["GPU-missing"], check_s=0.05)
    sup.check_once()
    assert gauge("GPU-missing") == 0
    state = sup.states()["GPU-missing"]
    assert not state.up and state.failures == 1 and "no-such-binary" in state.last_error
    sup.check_once()  # inside the backoff window: no second attempt yet
    assert sup.states()["GPU-missing"].starts == 1


def test_daemon_of_a_vanished_unit_is_stopped(short_dir, mps_binary):
    present = {"GPU-a", "GPU-b"}
    sup = MpsSupervisor(str(short_dir / "mps"), mps_binary, lambda: sorted(present), 0.05)
    try:
        sup.check_once()
        assert sup.is_up("GPU-a") and sup.is_up("GPU-b")
        present.discard("GPU-b")
        sup.check_once()
        assert set(sup.states()) == {"GPU-a"}
        assert gauge("GPU-b") is None  # series removed with the unit
        assert daemon_pid(short_dir / "mps", "GPU-b") is None
    finally:
        sup.stop()
