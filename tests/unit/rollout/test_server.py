import os
import sys
import textwrap

import pytest

from megatron_mgrpo.parallel.ports import free_port
from megatron_mgrpo.rollout.server import ServerError, ServerProcess, ServerSpec

FAKE_SERVER = textwrap.dedent("""
    import http.server, os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    print("fake server up", flush=True)
    if sys.argv[3] == "crash":
        sys.exit(3)
    if sys.argv[3] == "mute":
        time.sleep(600)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health" and self.headers.get("Authorization") == "Bearer secret"
            self.send_response(200 if ok else 401)
            self.end_headers()
        def log_message(self, *args):
            pass

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
""")


def spec_for(tmp_path, mode, timeout=30.0):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = free_port()
    return ServerSpec(command=[sys.executable, str(script), str(port), str(tmp_path / "child.pid"), mode],
                      port=port, log_file=tmp_path / "logs" / "server.log", api_key="secret",
                      startup_timeout_s=timeout)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a reaped-later zombie is not alive
        return stat.read().split()[2] != "Z"


@pytest.mark.slow
def test_start_health_and_stop_whole_group(tmp_path):
    server = ServerProcess(spec_for(tmp_path, "serve"))
    with server:
        assert server.healthy() and server.is_alive()
        child = int((tmp_path / "child.pid").read_text())
        assert alive(child)
    assert not server.is_alive()
    assert not alive(child), "the server's children must stop with it"
    assert "fake server up" in (tmp_path / "logs" / "server.log").read_text()


@pytest.mark.slow
def test_crash_during_startup_quotes_the_log(tmp_path):
    server = ServerProcess(spec_for(tmp_path, "crash"))
    with pytest.raises(ServerError, match="exited with code 3") as err:
        server.start()
    assert "fake server up" in str(err.value)
    server.stop()
    assert not alive(int((tmp_path / "child.pid").read_text()))


@pytest.mark.slow
def test_never_healthy_times_out_and_cleans_up(tmp_path):
    server = ServerProcess(spec_for(tmp_path, "mute", timeout=2.0))
    with pytest.raises(ServerError, match="not healthy .* after 2 s"):
        server.start()
    assert not server.is_alive()
    assert not alive(int((tmp_path / "child.pid").read_text()))


@pytest.mark.slow
def test_wrong_api_key_is_not_healthy(tmp_path):
    spec = spec_for(tmp_path, "serve")
    with ServerProcess(spec) as server:
        spec.api_key = "wrong"
        assert not server.healthy()


@pytest.mark.slow
def test_a_port_another_server_answers_on_is_refused(tmp_path):
    """Starting where a server already answers would take its health for ours while ours fails
    to bind; it is an error instead, and the running server is left alone."""
    spec = spec_for(tmp_path, "serve")
    with ServerProcess(spec) as running:
        second = ServerProcess(ServerSpec(command=spec.command, port=spec.port, log_file=tmp_path / "second.log",
                                          api_key="secret", startup_timeout_s=30.0))
        with pytest.raises(ServerError, match=f"already answers at {spec.url}"):
            second.start()
        assert not second.is_alive() and running.healthy()


def test_free_ports_are_never_handed_out_twice():
    """Servers set up before any of them binds must not share a port: the OS may offer a
    just-released one again (two fake SGLang servers once got the same port, and the second
    engine joined the first server's weight group twice)."""
    ports = [free_port() for _ in range(64)]
    assert len(set(ports)) == len(ports)
