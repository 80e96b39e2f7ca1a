"""Unit tests of the BTF answers kept on disk (tracer/kernel/btfmemo.py),
against the running kernel's BTF, with a cache directory of the test's own;
no root or BPF."""

from __future__ import annotations

import os

import pytest

from tracer.kernel import btfmemo, hooks, objcache, offsets
from tracer.kernel.btf import BTF, BTFError

VMLINUX = "/sys/kernel/btf/vmlinux"

pytestmark = pytest.mark.skipif(not os.access(VMLINUX, os.R_OK), reason=f"{VMLINUX} not readable")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("TCPCOLLIDE_CACHE_DIR", str(d))
    monkeypatch.setattr(objcache, "untrusted", lambda path: None)  # these files are the test user's
    return d


def ask_the_start_up_questions(btf) -> tuple:
    """What the tracer asks at start-up: offsets, TCP states, functions and tracepoint prototypes."""
    return (offsets.btf_defines(btf), offsets.tcp_states(btf), sorted(f for f in hooks.probe_functions()
                                                                       if btf.has_func(f)),
            [btf.tracepoint_args(t.split(":")[1]) for t in sorted(hooks.RAW_ARGS)])


def test_answers_from_disk_are_the_btfs_own_and_need_no_parse(cache):
    truth = ask_the_start_up_questions(BTF.load(VMLINUX))
    first = btfmemo.load(VMLINUX)
    assert first.parsed  # nothing on disk yet: parsed at once
    assert ask_the_start_up_questions(first) == truth
    first.save()
    assert len(list(cache.glob("btf-*.json"))) == 1
    second = btfmemo.load(VMLINUX)
    assert ask_the_start_up_questions(second) == truth
    assert not second.parsed, "a start on a known kernel should not parse its BTF"


def test_a_missing_member_is_an_answer_too(cache):
    first = btfmemo.load(VMLINUX)
    with pytest.raises(BTFError):
        first.member_offset("tcp_sock", "no_such_member_here")
    first.save()
    second = btfmemo.load(VMLINUX)
    with pytest.raises(BTFError):
        second.member_offset("tcp_sock", "no_such_member_here")
    assert not second.parsed


def test_a_question_never_asked_before_is_asked_of_the_btf(cache):
    first = btfmemo.load(VMLINUX)
    first.has_func("tcp_set_state")
    first.save()
    second = btfmemo.load(VMLINUX)
    assert second.member_offset("sock_common", "skc_family") == BTF.load(VMLINUX).member_offset(
        "sock_common", "skc_family")
    assert second.parsed and second.fresh


def test_answers_of_another_reader_are_not_used(cache, monkeypatch):
    first = btfmemo.load(VMLINUX)
    first.has_func("tcp_set_state")
    first.save()
    monkeypatch.setattr(btfmemo, "_reader_digest", lambda: "another reader")
    assert btfmemo.load(VMLINUX).parsed


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"format": 99, "answers": {}}'])
def test_a_bad_answers_file_is_ignored(cache, content):
    first = btfmemo.load(VMLINUX)
    first.has_func("tcp_set_state")
    first.save()
    (path,) = cache.glob("btf-*.json")
    path.write_bytes(content)
    again = btfmemo.load(VMLINUX)
    assert again.parsed and again.has_func("tcp_set_state")


def test_without_a_cache_dir_nothing_is_written(monkeypatch, tmp_path):
    monkeypatch.setenv("TCPCOLLIDE_CACHE_DIR", "")
    memo = btfmemo.load(VMLINUX)
    memo.has_func("tcp_set_state")
    memo.save()
    assert memo.parsed and memo.fresh
