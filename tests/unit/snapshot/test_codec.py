"""State dataclasses to JSON and back."""

from __future__ import annotations

import dataclasses

import pytest

from pyvmm.devices.virtio.block import VirtioBlockState
from pyvmm.snapshot.codec import CodecError, decode, encode
from pyvmm.snapshot.state import MicrovmState, pack_state, unpack_state
from tests.unit.snapshot.sample import make_state


def test_a_device_state_behind_object_carries_its_type() -> None:
    state = make_state()
    block = dataclasses.replace(
        state.devices.virtio["rng"], device=VirtioBlockState(4096, True, {"reads": 2})
    )
    devices = dataclasses.replace(state.devices, virtio={"data": block})
    state = dataclasses.replace(state, devices=devices)
    encoded = encode(state)
    assert encoded["devices"]["virtio"]["data"]["device"]["type"] == "VirtioBlockState"
    assert encoded["devices"]["legacy"]["serial"]["type"] == "SerialState"
    assert unpack_state(pack_state(state)).devices.virtio["data"].device == block.device


def test_decode_names_the_field_that_does_not_fit() -> None:
    data = encode(make_state())
    data["vcpus"][0]["msrs"]["16"] = "lots"
    with pytest.raises(CodecError, match=r"state.vcpus\[0\].msrs\[16\]: expected an integer"):
        decode(data, MicrovmState, {})
    data = encode(make_state())
    data["devices"]["virtio"]["rng"]["device"] = {"type": "os.system", "state": {}}
    with pytest.raises(CodecError, match="unknown state type"):
        decode(data, MicrovmState, {})
    data = encode(make_state())
    data["config"]["surprise"] = 1
    with pytest.raises(CodecError, match="unknown field 'surprise'"):
        decode(data, MicrovmState, {})
