"""The `emulator` command: start (idempotent, refuses a busy port), env, seed, status,
stop; and all of it inside a network namespace, as the lab runs it."""

import os
import socket
import subprocess

import pytest
from conftest import ROOT, free_port

EMU = os.path.join(ROOT, "emulator")


def run(*args, port, netns=None, check=True):
    cmd = ([ "ip", "netns", "exec", netns] if netns else []) + [EMU, *args]
    p = subprocess.run(cmd, env={**os.environ, "EMULATOR_PORT": str(port)}, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_lifecycle_on_loopback():
    port = free_port()
    try:
        out = run("start", port=port)
        assert "ready in" in out.stderr
        assert "already running" in run("start", port=port).stderr
        env = run("env", port=port).stdout
        assert f"export AWS_ENDPOINT_URL_EC2=http://127.0.0.1:{port}" in env
        assert f"export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:{port}/" in env
        ids = run("seed", "--type", "t3.medium", "--count", "2", port=port).stdout.split()
        assert len(ids) == 2 and all(i.startswith("i-") for i in ids)
        assert "running" in run("status", port=port).stdout
    finally:
        run("stop", port=port)
    assert run("status", port=port, check=False).returncode == 3


def test_busy_port_is_refused():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        p = run("start", port=port, check=False)
        assert p.returncode != 0
        assert f"port {port}" in p.stderr and "in use" in p.stderr
    finally:
        s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_inside_a_network_namespace():
    ns = f"emu-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        port = 5000
        run("start", port=port, netns=ns)
        ids = run("seed", port=port, netns=ns).stdout.split()
        assert len(ids) == 1
        run("stop", port=port, netns=ns)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
