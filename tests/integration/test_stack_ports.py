"""The embedded stack's SeaweedFS when a port it was given is taken before it can bind it.

Ports are picked free, but SeaweedFS's gRPC listeners sit at HTTP port + 10000, in the range the kernel hands out
to outgoing connections: on a busy machine one can be taken between the pick and the start. `s3_up` then sees the
bind error in SeaweedFS's log at once (no 90 s wait), picks new ports, saves them and starts again.
"""

import socket

import pytest

from tasks.devstack import stack

pytestmark = pytest.mark.integration


@pytest.fixture
def own_stack(tmp_path, monkeypatch):
    """A state folder of its own: its settings, pid files and logs, not the session stack's."""
    monkeypatch.setenv("ECB_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ECB_STACK_MANAGED", "1")  # the session's S3 endpoint in the environment is not external
    s = stack.init_settings()
    yield s
    stack.WEED.stop(timeout=5)


def test_seaweedfs_starts_on_new_ports_when_one_was_taken(own_stack):
    s = own_stack
    first = s["s3_port"]
    with socket.socket() as squatter:  # what an outgoing connection would do to the S3 gRPC port
        squatter.bind(("127.0.0.1", first + 10000))
        squatter.listen()
        assert stack.s3_up(s) == f"http://127.0.0.1:{s['s3_port']}"
    assert s["s3_port"] != first
    assert stack.load_settings()["s3_port"] == s["s3_port"]  # saved: later processes use the new ports
    log = stack.WEED.log.read_text()
    assert f"127.0.0.1:{first + 10000}: bind: address already in use" in log
    assert log.count("=== ") == 2  # started twice, not three times
    assert not stack.port_free(s["s3_port"])
