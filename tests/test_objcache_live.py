"""Live tests of the compiled-object cache (tracer/kernel/objcache.py): the
real tracer, started twice on this kernel with a cache directory of the
test's own, loads the second time what it compiled the first, and the
programs it loads from the cache detect the demo's collision (real sockets
in the demo's namespace). A cached object that is corrupt, that the kernel
refuses, or that sits in a directory others can write is never used."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import struct
import subprocess
import time

import pytest

from tests.live import BACKEND, BIN, SLOW, bpf_prog_ids

pytestmark = pytest.mark.live


def run(args: list[str], cache, timeout: float = 120) -> tuple[int, list[dict], str]:
    env = {**os.environ, "TCPCOLLIDE_CACHE_DIR": str(cache)}
    r = subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout * SLOW, env=env)
    return r.returncode, [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")], r.stderr


def demo(cache) -> tuple[dict, list[dict], str]:
    rc, records, stderr = run(["demo", "--json", "--backend", BACKEND], cache)
    assert rc == 0, stderr
    assert "Traceback" not in stderr
    found = collisions(records)
    assert len(found) == 1 and found[0]["outcome"] == "recovered", found
    return records[0], found, stderr


def cached_files(cache) -> list:
    return sorted(cache.glob("obj-*.json"))


def rewrite(path, change) -> None:
    """Change the object inside a cache file and give it a matching checksum
    (so that only the kernel can find it wrong)."""
    outer = json.loads(path.read_bytes())
    obj = json.loads(outer["object"])
    change(obj)
    body = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    path.write_text(json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "object": body}))


@pytest.fixture
def cache(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    return d


def test_the_second_start_loads_what_the_first_compiled_and_detects_the_collision(cache):
    first, found1, _ = demo(cache)
    # every backend's object is kept: fentry/fexit programs are loaded again with the attach
    # type and BTF id of their function, found at load time
    assert first["object_cache"]["state"] == "stored", first["object_cache"]
    assert "compile_load" in first["stages_s"] and "load_cached" not in first["stages_s"]
    # one object per plan the start tried: a hook the self-test found silent (an inlined
    # function: fentry on inet_csk_reqsk_queue_add on Debian's 6.x) makes a second plan
    replanned = any("attached but never fired" in h["note"] for h in first["hooks"])
    assert len(cached_files(cache)) == 1 + replanned
    second, found2, _ = demo(cache)
    assert second["object_cache"] == {"state": "hit", "path": first["object_cache"]["path"]}
    assert "load_cached" in second["stages_s"] and "compile_load" not in second["stages_s"]
    # the same hooks, each proven to fire by the self-test, and the same collision
    assert [(h["logical"], h["verified"]) for h in second["hooks"]] == \
        [(h["logical"], h["verified"]) for h in first["hooks"]]
    assert [(c["server"], c["client"], c["lingering_state"]) for c in found2] == \
        [(c["server"], c["client"], c["lingering_state"]) for c in found1]


def test_a_tracer_loaded_from_the_cache_detaches_everything_on_sigterm(cache):
    rc, records, stderr = run(["trace", "--json", "--duration", "0.2"], cache)
    assert rc == 0, stderr
    if records[0]["object_cache"]["state"] == "unsupported":
        pytest.skip("this backend's programs are not cached")
    before = bpf_prog_ids()
    proc = subprocess.Popen([str(BIN), "trace", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TCPCOLLIDE_CACHE_DIR": str(cache)})
    try:
        ready = json.loads(proc.stdout.readline())
        during = bpf_prog_ids() - before
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30 * SLOW)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ready["object_cache"]["state"] == "hit"
    assert len(during) >= 5, "the cached programs should be loaded while it runs"
    assert proc.returncode == 0 and "Traceback" not in err, err
    deadline = time.monotonic() + 5 * SLOW
    while bpf_prog_ids() & during and time.monotonic() < deadline:
        time.sleep(0.1)  # the kernel frees a closed program after a grace period
    assert bpf_prog_ids() & during == set(), "programs left attached after exit"


def test_a_corrupt_cached_object_is_compiled_again_and_replaced(cache):
    first, _, _ = demo(cache)
    if first["object_cache"]["state"] == "unsupported":
        pytest.skip("this backend's programs are not cached")
    path = cached_files(cache)[0]
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a crash mid-write elsewhere
    second, _, _ = demo(cache)
    assert second["object_cache"]["state"] == "corrupt", second["object_cache"]
    assert second["object_cache"]["why"].endswith("; replaced")
    assert "compile_load" in second["stages_s"]
    third, _, _ = demo(cache)
    assert third["object_cache"]["state"] == "hit"


def test_a_cached_object_the_kernel_refuses_is_compiled_again(cache):
    first, _, _ = demo(cache)
    if first["object_cache"]["state"] == "unsupported":
        pytest.skip("this backend's programs are not cached")
    path = cached_files(cache)[0]

    def break_programs(obj):
        for f in obj["funcs"]:  # `exit` with r0 never written: every verifier refuses it
            f["insns"] = base64.b64encode(struct.pack("<BBhi", 0x95, 0, 0, 0)).decode()
            f["relocs"] = []

    rewrite(path, break_programs)
    second, _, _ = demo(cache)
    assert second["object_cache"]["state"] == "failed", second["object_cache"]
    assert "loading the cached object" in second["object_cache"]["why"]
    assert second["object_cache"]["why"].endswith("; replaced")
    third, _, _ = demo(cache)
    assert third["object_cache"]["state"] == "hit"


def test_a_cache_directory_others_can_write_is_never_read(cache):
    rc, records, stderr = run(["trace", "--json", "--duration", "0.2"], cache)
    assert rc == 0, stderr
    if records[0]["object_cache"]["state"] == "unsupported":
        pytest.skip("this backend's programs are not cached")
    assert records[0]["object_cache"]["state"] == "stored"
    os.chmod(cache, 0o777)
    rc, records, stderr = run(["trace", "--json", "--duration", "0.2"], cache)
    assert rc == 0, stderr
    state = records[0]["object_cache"]
    assert state["state"] == "refused" and "writable by others" in state["why"], state
    assert "compile_load" in records[0]["stages_s"]


def test_an_empty_cache_dir_turns_the_cache_off():
    rc, records, stderr = run(["trace", "--json", "--duration", "0.2"], "")
    assert rc == 0, stderr
    assert records[0]["object_cache"] == {"state": "off", "path": None}


def collisions(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "collision"]
