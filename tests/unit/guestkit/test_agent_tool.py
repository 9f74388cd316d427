"""The guest agent: built static with the host's gcc, cached by the hash of its sources."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from pyvmm.errors import HostError
from pyvmm.guestkit import agent_tool


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-cache")


@pytest.fixture(scope="module")
def agent(cache: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return agent_tool.build_agent(cache_dir=cache)


def test_static_x86_64_executable(agent: Path, cache: Path) -> None:
    assert agent.name == "pyvmm-agent"
    assert agent.parent.parent == cache / "agent"
    with agent.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf["e_machine"] == "EM_X86_64"
        kinds = {seg["p_type"] for seg in elf.iter_segments()}
        assert "PT_INTERP" not in kinds  # no dynamic loader: runs in a bare initramfs
        assert "PT_DYNAMIC" not in kinds
    assert agent.stat().st_mode & 0o111


def test_usage_and_version(agent: Path) -> None:
    version = subprocess.run([str(agent), "--version"], capture_output=True, text=True, timeout=10)
    assert (version.returncode, version.stdout) == (0, "pyvmm-agent protocol 1..1\n")
    for bad in (["--port"], ["--port", "x"], ["--port", "-1"], ["--bogus", "1"], ["--unix", ""]):
        proc = subprocess.run([str(agent), *bad], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 2, bad
        assert proc.stderr.startswith("usage: pyvmm-agent [--port PORT]")


def test_listen_failure_is_one_line(agent: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_bytes(b"")
    proc = subprocess.run(
        [str(agent), "--unix", str(taken)], capture_output=True, text=True, timeout=10
    )
    assert proc.returncode == 1
    assert proc.stderr == f"pyvmm-agent: cannot listen on {taken}: Address already in use\n"


def test_cached_until_a_source_changes(
    agent: Path, cache: Path, tmp_path: Path, monkeypatch
) -> None:
    mtime = agent.stat().st_mtime_ns
    assert agent_tool.build_agent(cache_dir=cache) == agent
    assert agent.stat().st_mtime_ns == mtime
    # An edited copy of the sources gets a new key, and a new build.
    src = tmp_path / "agent-src"
    shutil.copytree(agent_tool.agent_source_dir(), src)
    monkeypatch.setattr(agent_tool, "agent_source_dir", lambda: src)
    assert agent_tool.build_agent(cache_dir=cache) == agent  # same bytes, same key
    with (src / "wire.c").open("a") as f:
        f.write("\n/* edited */\n")
    rebuilt = agent_tool.build_agent(cache_dir=cache)
    assert rebuilt != agent and rebuilt.is_file()
    assert sorted(p.name for p in (cache / "agent").iterdir()) == sorted(
        [agent.parent.name, rebuilt.parent.name]
    )


def test_a_build_error_is_reported_with_gccs_message(
    cache: Path, tmp_path: Path, monkeypatch
) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "broken"
    shutil.copytree(agent_tool.agent_source_dir(), src)
    (src / "main.c").write_text("int main(void) { return undeclared; }\n")
    monkeypatch.setattr(agent_tool, "agent_source_dir", lambda: src)
    with pytest.raises(HostError, match=r"(?s)building pyvmm-agent failed .*undeclared"):
        agent_tool.build_agent(cache_dir=cache)
    assert not [p for p in (cache / "agent").iterdir() if p.name.startswith(".tmp-")]


def test_gcc_missing(cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(agent_tool, "_cache_key", lambda sources: "0" * 16)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(HostError, match="gcc not found on PATH"):
        agent_tool.build_agent(cache_dir=cache)
