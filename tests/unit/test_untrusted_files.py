"""Checkpoints and cache entries from strangers load without executing code."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch

from methods.core.context import UnsafeCheckpointError, deserialize_state, serialize_state


class Payload:
    """Writes a file when unpickled, as a malicious checkpoint would run code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload(str(marker))}, buffer)
    with pytest.raises(UnsafeCheckpointError, match="executable objects"):
        deserialize_state(buffer.getvalue())
    assert not marker.exists(), "the payload must never run"
    # the same payload through plain pickle would have run: the test's payload is real
    pickle.loads(pickle.dumps(Payload(str(marker))))
    assert marker.exists()


def test_full_state_checkpoints_round_trip():
    state = {"step": 3, "models": {"m": {"w": torch.arange(4.0)}}, "rng": {"torch": torch.get_rng_state()}}
    back = deserialize_state(serialize_state(state))
    assert back["step"] == 3 and torch.equal(back["models"]["m"]["w"], torch.arange(4.0))


def test_cache_entries_are_safetensors_and_json(tmp_path, badnets_backdoor):
    badnets_backdoor.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backdoor.json", "backdoor.safetensors"]
    head = (tmp_path / "backdoor.safetensors").read_bytes()[:8]
    assert len(head) == 8 and not head.startswith(b"\\x80"), "no pickle protocol header"
