"""Each sandbox's identity: distinct CIDs, TAPs and MACs, and the agent command that applies it."""

from __future__ import annotations

import re

from pyvmm.config import MIN_GUEST_CID, check_guest_cid, check_mac
from pyvmm.sandbox import identity as ident


def test_identities_are_distinct() -> None:
    many = [ident.new_identity([None, "mytap"]) for _ in range(200)]
    assert len({i.cid for i in many}) == 200
    assert len({i.name for i in many}) == 200
    assert len({i.taps[0] for i in many}) == 200
    assert all(i.taps[1] == "mytap" for i in many)
    for i in many:
        assert check_guest_cid(i.cid) >= MIN_GUEST_CID
        assert re.fullmatch(r"sbx-[0-9a-f]{12}", i.name)
        assert all(len(tap) <= 15 for tap in i.taps)  # IFNAMSIZ
        for mac in i.macs:
            check_mac(mac)
            first = int(mac[:2], 16)
            assert first & 0x02 and not first & 0x01  # locally administered, unicast


def test_identity_command_sets_name_clock_and_changed_macs() -> None:
    identity = ident.Identity("sbx-1", 7, ("t0", "t1"), ("02:00:00:00:00:0a", "02:00:00:00:00:0b"))
    argv = ident.identity_command(identity, ("02:00:00:00:00:0a", "02:00:00:00:00:01"))
    assert argv[:4] == ["pyvmm-agent", "--identity", "--hostname", "sbx-1"]
    assert argv[4] == "--time" and re.fullmatch(r"\d+\.\d{6}", argv[5])
    assert argv[6:] == ["--mac", "02:00:00:00:00:01=02:00:00:00:00:0b"]  # only the one that differs
    assert "--time" not in ident.identity_command(identity, set_clock=False)


def test_seeds_differ() -> None:
    assert len(ident.seed()) == ident.SEED_BYTES
    assert ident.seed() != ident.seed()
