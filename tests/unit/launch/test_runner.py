import sys

import httpx
import pytest

from megatron_mgrpo.launch.render import Engine, Step
from megatron_mgrpo.launch.runner import run_steps
from megatron_mgrpo.parallel.ports import free_port

# A stand-in rollout server: answers 200 on every GET, so /health passes.
SERVER = ("import http.server, sys\n"
          "class H(http.server.BaseHTTPRequestHandler):\n"
          "    def do_GET(self):\n"
          "        self.send_response(200); self.end_headers()\n"
          "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


@pytest.mark.slow
def test_servers_are_healthy_before_the_trainer_and_stopped_after(tmp_path):
    port = free_port()
    marker = tmp_path / "trainer-saw-server"
    trainer = ("import sys, urllib.request\n"
               f"urllib.request.urlopen('http://127.0.0.1:{port}/health')\n"
               f"open({str(marker)!r}, 'w').close()\n"
               "sys.exit(3)\n")
    steps = [Step("policy-engine-0", (sys.executable, "-c", SERVER, str(port)),
                  Engine("policy", 0, "127.0.0.1", (0,), port)),
             Step("train", (sys.executable, "-c", trainer))]
    assert run_steps(steps, str(tmp_path), startup_timeout_s=60) == 3
    assert marker.exists()
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        alive = True
    except httpx.HTTPError:
        alive = False
    assert not alive, "the server outlived the run"
