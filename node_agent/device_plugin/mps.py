"""MPS mode: one CUDA MPS control daemon per unit, each with its own pipe and log directory
and CUDA_VISIBLE_DEVICES=<unit uuid>, so a pod's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE caps it
against the other pods of that unit only. The supervisor starts missing daemons, probes each
(as NVIDIA's plugin does, `get_default_active_thread_percentage` through the control client),
restarts dead ones with backoff, and reports `copack_mps_daemon_up{uuid}`."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from node_agent.device_plugin import metrics

log = logging.getLogger(__name__)

PROBE_COMMAND = "get_default_active_thread_percentage"
COMMAND_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 60.0
STARTUP_PROBES = 10
STARTUP_PROBE_GAP_S = 0.2
HISTORY = 20


def unit_dir(root: str, uuid: str) -> str:
    return os.path.join(root, uuid)


def pipe_dir(root: str, uuid: str) -> str:
    return os.path.join(unit_dir(root, uuid), "pipe")


def log_dir(root: str, uuid: str) -> str:
    return os.path.join(unit_dir(root, uuid), "log")


@dataclass
class DaemonState:
    uuid: str
    up: bool = False
    started: bool = False
    starts: int = 0
    failures: int = 0
    next_try: float = 0.0
    last_error: str = ""
    history: list[str] = field(default_factory=list)


class MpsSupervisor:
    def __init__(
        self,
        root: str,
        binary: str,
        units: Callable[[], Iterable[str]],
        check_s: float = 5.0,
    ) -> None:
        self._root = root
        self._binary = binary
        self._units = units
        self._check_s = check_s
        self._lock = threading.Lock()
        self._daemons: dict[str, DaemonState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control client ------------------------------------------------------------------

    def _env(self, uuid: str) -> dict[str, str]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = uuid
        env["CUDA_MPS_PIPE_DIRECTORY"] = pipe_dir(self._root, uuid)
        env["CUDA_MPS_LOG_DIRECTORY"] = log_dir(self._root, uuid)
        return env

    def _run(self, uuid: str, args: list[str], stdin: str | None) -> tuple[bool, str]:
        try:
            proc = subprocess.run(
                [self._binary, *args],
                input=stdin,
                env=self._env(uuid),
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        out = (proc.stdout + proc.stderr).strip()
        return proc.returncode == 0, out or f"exit status {proc.returncode}"

    def send(self, uuid: str, command: str) -> tuple[bool, str]:
        """One command through the control client (`echo CMD | nvidia-cuda-mps-control`)."""
        return self._run(uuid, [], command + "\n")

    # ---- supervision -----------------------------------------------------------------------

    def start(self) -> None:
        self.check_once()
        self._thread = threading.Thread(target=self._loop, name="dp-mps", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=COMMAND_TIMEOUT_S + 2)
        with self._lock:
            uuids = list(self._daemons)
        for uuid in uuids:
            self._quit(uuid)

    def is_up(self, uuid: str) -> bool:
        with self._lock:
            d = self._daemons.get(uuid)
            return bool(d and d.up)

    def states(self) -> dict[str, DaemonState]:
        with self._lock:
            return {k: DaemonState(**vars(v)) for k, v in self._daemons.items()}

    def _loop(self) -> None:
        while not self._stop.wait(self._check_s):
            try:
                self.check_once()
            except Exception:
                log.exception("MPS supervision pass failed")

    def _quit(self, uuid: str) -> None:
        ok, out = self.send(uuid, "quit")
        if not ok:
            log.info("MPS daemon of %s did not take 'quit': %s", uuid, out)
        metrics.MPS_DAEMON_UP.labels(uuid).set(0)
        with self._lock:
            d = self._daemons.get(uuid)
            if d is not None:
                d.up = False
                d.started = False

    def check_once(self) -> None:
        """One pass: stop daemons of vanished units, probe the rest, (re)start dead ones."""
        desired = set(self._units())
        with self._lock:
            gone = [u for u in self._daemons if u not in desired]
        for uuid in gone:
            self._quit(uuid)
            with self._lock:
                self._daemons.pop(uuid, None)
            metrics.MPS_DAEMON_UP.remove(uuid)
            log.info("MPS daemon of removed unit %s stopped", uuid)
        for uuid in sorted(desired):
            if self._stop.is_set():
                return
            self._check_unit(uuid)

    def _check_unit(self, uuid: str) -> None:
        with self._lock:
            d = self._daemons.setdefault(uuid, DaemonState(uuid))
        if d.started:
            ok, out = self.send(uuid, PROBE_COMMAND)
            if ok:
                if not d.up:
                    log.info("MPS daemon of %s is up", uuid)
                self._mark(d, up=True)
                return
            log.warning("MPS daemon of %s does not answer (%s); restarting", uuid, out)
            d.last_error = out
            self._mark(d, up=False)
            d.started = False
        if time.monotonic() < d.next_try:
            return
        self._start(d)

    def _start(self, d: DaemonState) -> None:
        for path in (pipe_dir(self._root, d.uuid), log_dir(self._root, d.uuid)):
            os.makedirs(path, exist_ok=True)
        if d.starts:
            # A hung daemon may still hold the pipe directory: ask it to quit first.
            self.send(d.uuid, "quit")
        d.starts += 1
        if d.starts > 1:
            metrics.MPS_DAEMON_RESTARTS.labels(d.uuid).inc()
        ok, out = self._run(d.uuid, ["-d"], None)
        if ok:
            # `-d` returns once the daemon forked; give it a moment to open its pipe.
            for _ in range(STARTUP_PROBES):
                ok, out = self.send(d.uuid, PROBE_COMMAND)
                if ok or self._stop.wait(STARTUP_PROBE_GAP_S):
                    break
        if ok:
            d.started = True
            d.failures = 0
            d.next_try = 0.0
            d.history = [*d.history, "started"][-HISTORY:]
            log.info("MPS daemon of %s started (start #%d)", d.uuid, d.starts)
            self._mark(d, up=True)
            return
        d.failures += 1
        d.last_error = out
        d.started = False
        delay = min(self._check_s * 2 ** (d.failures - 1), MAX_BACKOFF_S)
        d.next_try = time.monotonic() + delay
        d.history = [*d.history, f"failed: {out}"][-HISTORY:]
        log.warning("MPS daemon of %s failed to start (%s); next try in %.1fs", d.uuid, out, delay)
        self._mark(d, up=False)

    def _mark(self, d: DaemonState, up: bool) -> None:
        with self._lock:
            d.up = up
        metrics.MPS_DAEMON_UP.labels(d.uuid).set(1 if up else 0)
