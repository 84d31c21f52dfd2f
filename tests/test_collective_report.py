"""The transport errors a dead or silent peer produces are recognised as such (the wording differs by
backend and by which side of the pair noticed first; the hung-rank chaos test meets them at random)."""

from __future__ import annotations

import pytest

from dmdx_lightning.callbacks.collectives import _is_peer_failure, _is_timeout

TIMEOUTS = [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv"),
    RuntimeError("Application timeout caused pair closure"),
    RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=3, OpType=ALLREDUCE)"),
]
DEATHS = [
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"),
    RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer"),
]


@pytest.mark.parametrize("error", TIMEOUTS, ids=["gloo_wait", "gloo_pair_closure", "nccl_watchdog"])
def test_a_collective_timeout_is_a_peer_failure_and_a_timeout(error):
    assert _is_peer_failure(error) and _is_timeout(error)


@pytest.mark.parametrize("error", DEATHS, ids=["closed", "reset"])
def test_a_dead_peer_is_a_peer_failure_but_not_a_timeout(error):
    assert _is_peer_failure(error) and not _is_timeout(error)


def test_an_ordinary_error_is_not_a_peer_failure():
    assert not _is_peer_failure(ValueError("shapes (2, 3) and (4,) cannot be broadcast"))
