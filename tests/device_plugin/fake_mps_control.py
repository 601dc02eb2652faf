"""Stand-in for `nvidia-cuda-mps-control` at the machine's edge (no GPU or CUDA here).

Behaves like the real control program as the plugin uses it:
  `fake_mps_control.py -d`   start a control daemon in the background for
                             $CUDA_MPS_PIPE_DIRECTORY (fails if one already answers there);
                             returns once it answers
  `echo CMD | fake_mps_control.py`
                             send CMD to that daemon over its control socket and print the reply;
                             exit 1 when no daemon answers
The daemon writes `nvidia-cuda-mps-control.pid` in the pipe directory and the environment it was
started with (CUDA_VISIBLE_DEVICES, log directory) to `control.log` in $CUDA_MPS_LOG_DIRECTORY.
Commands: get_default_active_thread_percentage, set_default_active_thread_percentage N, quit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

PIPE = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
LOGDIR = os.environ.get("CUDA_MPS_LOG_DIRECTORY", "/var/log/nvidia-mps")
CONTROL = os.path.join(PIPE, "control")
PIDFILE = os.path.join(PIPE, "nvidia-cuda-mps-control.pid")


def ask(command: str, timeout: float = 2.0) -> str | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(CONTROL)
            s.sendall(command.encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while data := s.recv(4096):
                chunks.append(data)
            return b"".join(chunks).decode()
    except OSError:
        return None


def serve() -> None:
    percentage = "100.0"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(CONTROL)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(CONTROL)
    srv.listen(8)
    with open(PIDFILE, "w") as f:
        f.write(str(os.getpid()))
    os.makedirs(LOGDIR, exist_ok=True)
    with open(os.path.join(LOGDIR, "control.log"), "a") as f:
        f.write(f"start pid={os.getpid()} "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}\n")
    while True:
        conn, _ = srv.accept()
        with conn:
            cmd = conn.makefile().readline().strip()
            if cmd == "quit":
                conn.sendall(b"")
                break
            if cmd == "get_default_active_thread_percentage":
                conn.sendall(percentage.encode() + b"\n")
            elif cmd.startswith("set_default_active_thread_percentage "):
                percentage = cmd.split()[1]
                conn.sendall(percentage.encode() + b"\n")
            else:
                conn.sendall(b"unknown command\n")
    srv.close()
    for path in (CONTROL, PIDFILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def daemonize() -> int:
    if ask("get_default_active_thread_percentage") is not None:
        print("An instance of this daemon is already running", file=sys.stderr)
        return 1
    os.makedirs(PIPE, exist_ok=True)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            try:
                serve()
            finally:
                os._exit(0)
        os._exit(0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if ask("get_default_active_thread_percentage") is not None:
            return 0
        time.sleep(0.01)
    print("daemon did not come up", file=sys.stderr)
    return 1


def client() -> int:
    status = 0
    for line in sys.stdin.read().splitlines():
        if not line.strip():
            continue
        reply = ask(line.strip())
        if reply is None:
            print("Cannot find MPS control daemon process", file=sys.stderr)
            status = 1
            continue
        sys.stdout.write(reply)
    return status


if __name__ == "__main__":
    sys.exit(daemonize() if sys.argv[1:] == ["-d"] else client())
