"""The embedded stack's SeaweedFS when a port it was given is taken before it can bind it.

Ports are picked free, but SeaweedFS's gRPC listeners sit at HTTP port + 10000, in the range the kernel hands out
to outgoing connections: on a busy machine one can be taken between the pick and the start. `s3_up` then fails at
once naming the port (it waited 90 s before); `ecb stack wipe` (or new ports in the settings) starts it again.
"""

import socket
import time

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


def test_a_taken_seaweedfs_port_fails_at_once_naming_it(own_stack):
    s = own_stack
    with socket.socket() as squatter:  # what an outgoing connection would do to the S3 gRPC port
        squatter.bind(("127.0.0.1", s["s3_port"] + 10000))
        squatter.listen()
        started = time.monotonic()
        with pytest.raises(stack.StackError) as err:
            stack.s3_up(s)
    assert time.monotonic() - started < 45  # not the 90 s health wait
    assert f"127.0.0.1:{s['s3_port'] + 10000}: bind: address already in use" in str(err.value)
    assert str(err.value).startswith("SeaweedFS S3 failed to start:")
