"""Unit tests of the compiled-object cache's key and lookup
(tracer/kernel/objcache.py), without root or BPF: synthetic build specs and
cache files in a temporary directory. Loading a cached object into the
kernel is tested live (tests/test_objcache_live.py)."""

from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import pytest

from tracer.kernel import objcache


def spec(**change):
    base = {"source_file": "tcpcollide.bpf.c", "text": "int x;", "cflags": ["-DA=1", "-DOFF_X=8"],
            "kernel_source": None, "header_dirs": []}
    return SimpleNamespace(**{**base, **change})


@pytest.mark.parametrize("change", [
    {"text": "int y;"},
    {"cflags": ["-DA=1", "-DOFF_X=16"]},  # an offset read from another kernel's BTF
    {"cflags": ["-DA=1"]},
    {"source_file": "other.bpf.c"},
])
def test_every_input_of_the_compile_is_in_the_key(change):
    assert objcache.key(spec(**change)) != objcache.key(spec())


def test_the_key_is_stable():
    assert objcache.key(spec()) == objcache.key(spec())


def test_the_compat_headers_are_in_the_key(tmp_path):
    (tmp_path / "linux").mkdir()
    header = tmp_path / "linux" / "types.h"
    header.write_text("typedef int s32;\n")
    before = objcache.key(spec(kernel_source=tmp_path))
    header.write_text("typedef long s32;\n")
    assert objcache.key(spec(kernel_source=tmp_path)) != before


def test_the_kernel_headers_configuration_is_in_the_key(tmp_path):
    (tmp_path / "generated").mkdir()
    conf = tmp_path / "generated" / "autoconf.h"
    conf.write_text("#define CONFIG_X 1\n")
    before = objcache.key(spec(header_dirs=[tmp_path]))
    conf.write_text("#define CONFIG_X 2\n")
    assert objcache.key(spec(header_dirs=[tmp_path])) != before


def test_the_running_kernel_is_in_the_key(monkeypatch):
    before = objcache.key(spec())
    monkeypatch.setattr(objcache.platform, "release", lambda: "9.9.9-other")
    assert objcache.key(spec()) != before


def write(path, obj: dict) -> None:
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    path.write_text(json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "object": body}))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("TCPCOLLIDE_CACHE_DIR", str(d))
    monkeypatch.setattr(objcache, "untrusted", lambda path: None)  # these files are the test user's
    return d


def test_an_empty_cache_dir_is_off(monkeypatch):
    monkeypatch.setenv("TCPCOLLIDE_CACHE_DIR", "")
    assert objcache.find(spec())[1].state == "off"


def test_the_default_cache_dir(monkeypatch):
    monkeypatch.delenv("TCPCOLLIDE_CACHE_DIR", raising=False)
    assert str(objcache.cache_dir()) == "/var/cache/tcpcollide-trace"


def test_a_miss_then_a_hit(cache):
    obj, outcome = objcache.find(spec())
    assert obj is None and outcome.state == "miss"
    write(cache / f"obj-{objcache.key(spec())}.json", {"format": objcache.FORMAT, "funcs": []})
    obj, outcome = objcache.find(spec())
    assert outcome.state == "hit" and obj == {"format": objcache.FORMAT, "funcs": []}
    assert objcache.find(spec(text="int z;"))[1].state == "miss"


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"sha256":"00","object":"{}"}', b"\xff\xfe"])
def test_a_file_that_does_not_parse_or_check_is_corrupt(cache, content):
    (cache / f"obj-{objcache.key(spec())}.json").write_bytes(content)
    obj, outcome = objcache.find(spec())
    assert obj is None and outcome.state == "corrupt"


def test_another_format_is_corrupt(cache):
    write(cache / f"obj-{objcache.key(spec())}.json", {"format": objcache.FORMAT + 1})
    obj, outcome = objcache.find(spec())
    assert obj is None and outcome.state == "corrupt" and "format" in outcome.why


def test_a_file_others_can_write_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir()
    os.chmod(d, 0o777)
    monkeypatch.setenv("TCPCOLLIDE_CACHE_DIR", str(d))
    write(d / f"obj-{objcache.key(spec())}.json", {"format": objcache.FORMAT})
    obj, outcome = objcache.find(spec())
    assert obj is None and outcome.state == "refused"
    assert "writable by others" in outcome.why or "not owned by root" in outcome.why


def test_untrusted_wants_root_and_no_writers_but_root(tmp_path):
    f = tmp_path / "x"
    f.write_text("")
    os.chmod(f, 0o644)
    why = objcache.untrusted(f)
    if os.geteuid() == 0:
        assert why is None
        os.chmod(f, 0o666)
        assert "writable by others" in objcache.untrusted(f)
    else:
        assert "not owned by root" in why
