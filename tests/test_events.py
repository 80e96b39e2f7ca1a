"""Unit tests for tracer.pipeline.events: the layout parsed from bpf/tcpcollide.h, and
decoding / encoding of `struct tc_event` records.

Recorded streams: test_fixture_records_decode and test_fixture_records_reencode
decode every raw record of tests/data/seed-loopback-ipv4.json and
seed-loopback-ipv6.json (recorded live by the tracepoint backend).
Synthetic data: everything else (Events built in Python, header text edited
in the test).
"""

from __future__ import annotations

import dataclasses
import re
import struct

import pytest

from tests import synthetic
from tracer.pipeline import correlator
from tracer.pipeline.events import (
    AF_INET,
    AF_INET6,
    ENUMS,
    EVENT_SIZE,
    EVENT_STRUCT,
    EVENT_TYPES,
    FIELDS,
    FLAGS,
    HEADER,
    HOOKS,
    DecodeError,
    Event,
    NAMED_FIELDS,
    Layout,
    LayoutError,
    decode,
    encode,
    format_addr,
    parse_layout,
)

SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "char": 1}
HEADER_TEXT = HEADER.read_text()


def offsets() -> dict[str, tuple[int, int]]:
    """field name -> (offset, element size), computed independently of the parser."""
    out, off = {}, 0
    for name, ctype, n in FIELDS:
        out[name] = (off, SIZES[ctype])
        off += SIZES[ctype] * (n or 1)
    return out


def patch_u(raw: bytes, name: str, value: int) -> bytes:
    """Overwrite one scalar field of a record."""
    off, size = offsets()[name]
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
    buf = bytearray(raw)
    struct.pack_into("<" + code, buf, off, value)
    return bytes(buf)


def sample_event(**kw) -> Event:
    base = dict(
        ts_ns=5_097_784_965_862, type="syn_challenged", hook="tp_kfree_skb", cpu=3, netns=4026532246,
        family=AF_INET6, laddr=synthetic.addr("2001:db8::1"), lport=12345, raddr=synthetic.addr("2001:db8::2"),
        rport=39836, oldstate=8, newstate=8, skaddr=0xFFFF8881030E0000, seq=2471878311, ack=2411062325,
        age_jiffies=264, flags=6, sk_ino=123456, pid=4811, comm="python3", backlog=2,
        max_backlog=4096,
    )
    base.update(kw)
    return Event(**base)


# -- the layout ------------------------------------------------------------------


def test_event_size_is_multiple_of_8_and_sum_of_fields():
    total = sum(SIZES[ctype] * (n or 1) for _, ctype, n in FIELDS)
    assert EVENT_SIZE == total == EVENT_STRUCT.size
    assert EVENT_SIZE % 8 == 0


def test_fields_are_naturally_aligned_without_padding():
    for name, (off, size) in offsets().items():
        assert off % size == 0, name
    # the struct format adds no hidden padding: "<" never pads, so the size is the sum
    assert EVENT_STRUCT.format.startswith("<")


def test_layout_matches_the_header_text():
    # every `__uN name;` line inside struct tc_event, counted by a second, simpler reading
    body = re.search(r"struct tc_event \{(.*?)\};", HEADER_TEXT, re.S).group(1)
    names = re.findall(r"^\s*\w+\s+(\w+)(?:\[\d+\])?;", body, re.M)
    assert [n for n, _, _ in FIELDS] == names
    assert "ts_ns" in names and "comm" in names


def test_every_header_field_is_an_event_attribute():
    attrs = {f.name for f in dataclasses.fields(Event)}
    assert {n for n, _, _ in FIELDS} <= attrs


def test_enums_from_header():
    assert set(EVENT_TYPES.values()) == {"syn_challenged", "rst_sent", "rst_received", "state", "retransmit", "queued",
                                        "challenge_ack", "client_challenged"}
    assert EVENT_TYPES[ENUMS["tc_event_type"]["TC_EV_SYN_CHALLENGED"]] == "syn_challenged"
    assert set(HOOKS.values()) >= {"tp_kfree_skb", "tp_set_state", "tp_send_reset", "tp_receive_reset"}
    assert FLAGS == {"TC_F_AGE_OBSERVED": 1, "TC_F_CHALLENGE_PASSED": 2, "TC_F_AGE_JIFFIES": 4,
                     "TC_F_CHALLENGE_SEEN": 8, "TC_F_SYN_STAMP": 16}


def test_correlator_handles_every_event_type():
    # feed() dispatches through its handler table, checked against the header at import
    assert set(correlator.START_HANDLERS) | set(correlator.STEP_HANDLERS) == set(EVENT_TYPES.values())


def test_every_header_field_is_decoded_at_its_offset():
    raw = bytearray(encode(sample_event()))
    codes = {1: "B", 2: "H", 4: "I", 8: "Q"}
    expected = {}
    for i, (name, ctype, n) in enumerate(FIELDS):
        off, size = offsets()[name]
        if name in ("type", "family") or name in NAMED_FIELDS:
            continue  # validated or named: covered by the tests below
        if n:
            value = bytes((i + k) % 251 + 1 for k in range(n - (ctype == "char")))
            raw[off:off + n] = value.ljust(n, b"\0")
            expected[name] = value.decode() if ctype == "char" else value.ljust(n, b"\0")
        else:
            value = (0x5A5A5A5A5A5A5A5A + i) & ((1 << 8 * size) - 1)
            struct.pack_into("<" + codes[size], raw, off, value)
            expected[name] = value
    ev = decode(bytes(raw))
    for name, value in expected.items():
        assert getattr(ev, name) == value, name
    assert encode(ev) == bytes(raw)


def edited_header(old: str, new: str) -> str:
    text = HEADER_TEXT.replace(old, new, 1)
    assert text != HEADER_TEXT
    return text


def test_a_field_added_to_the_header_is_an_event_attribute_decoded_and_encoded():
    # a new __u64 before the 32-bit fields keeps the natural alignment
    layout = Layout(edited_header("__u64 skaddr;", "__u64 skaddr;\n\t__u64 extra_ns; /* new */"))
    assert layout.size == EVENT_SIZE + 8
    assert "extra_ns" in {f.name for f in dataclasses.fields(layout.event)}
    ev = layout.event(type="state", hook="tp_set_state", family=AF_INET, extra_ns=123456789, lport=1, skaddr=7)
    back = layout.decode(layout.encode(ev))
    assert back == ev and back.extra_ns == 123456789 and back.skaddr == 7
    with pytest.raises(TypeError):
        Event(type="state", extra_ns=1)  # the real header has no such field


def test_a_field_renamed_in_the_header_is_renamed_in_event():
    layout = Layout(edited_header("__u32 unread;", "__u32 unread_bytes;"))
    names = {f.name for f in dataclasses.fields(layout.event)}
    assert "unread_bytes" in names and "unread" not in names
    raw = patch_u(encode(sample_event()), "unread", 4242)  # same offset, same size
    assert layout.decode(raw).unread_bytes == 4242 == decode(raw).unread
    assert layout.size == EVENT_SIZE


def test_event_types_and_flags_come_from_the_header():
    layout = Layout(edited_header("TC_EV_QUEUED = 6,", "TC_EV_ENQUEUED = 6,"))
    assert "enqueued" in layout.event_types.values() and "queued" not in layout.event_types.values()
    ev = layout.event(type="enqueued", hook="kp_queue_add", family=AF_INET)
    assert layout.decode(layout.encode(ev)).type == "enqueued"
    with pytest.raises(ValueError, match="unknown event type"):
        layout.event(type="queued", family=AF_INET)
    with pytest.raises(ValueError, match="unknown event type"):
        sample_event(type="enqueued")


def test_parse_layout_of_the_real_header_is_the_module_layout():
    fmt, fields, enums = parse_layout(HEADER_TEXT)
    assert fmt == EVENT_STRUCT.format
    assert fields == FIELDS
    assert enums == ENUMS


def test_parse_layout_rejects_a_misaligned_field():
    text = HEADER_TEXT.replace("__u64 ts_ns;", "__u64 ts_ns;\n\t__u8 oops;", 1)
    assert text != HEADER_TEXT
    with pytest.raises(LayoutError, match="skaddr"):
        parse_layout(text)


def test_parse_layout_rejects_a_size_not_multiple_of_8():
    text = re.sub(r"^\s*__u32 max_backlog;.*$", "", HEADER_TEXT, count=1, flags=re.M)
    assert text != HEADER_TEXT
    with pytest.raises(LayoutError, match="multiple of 8"):
        parse_layout(text)


def test_parse_layout_rejects_a_header_without_the_struct():
    text = re.sub(r"struct tc_event \{.*?\};", "", HEADER_TEXT, flags=re.S)
    assert "struct tc_event {" not in text
    with pytest.raises(LayoutError, match="not found"):
        parse_layout(text)
    with pytest.raises(LayoutError):
        parse_layout("")


def test_parse_layout_rejects_a_field_of_unknown_type():
    text = "struct tc_event {\n\t__u64 a;\n\t__s32 b;\n\t__s32 c;\n\t__u64 d;\n};\n"
    with pytest.raises(LayoutError, match="__s32 b"):
        parse_layout(text)  # a skipped field would make the decoder drift from the C struct


def test_parse_layout_rejects_two_fields_on_one_line_and_an_empty_struct():
    with pytest.raises(LayoutError):
        parse_layout("struct tc_event {\n\t__u64 a;\n\t__u32 b; __u32 c;\n};\n")
    with pytest.raises(LayoutError, match="no fields"):
        parse_layout("struct tc_event {\n\t/* nothing */\n};\n")


# -- encode / decode ----------------------------------------------------------------


def test_encode_decode_round_trip():
    ev = sample_event()
    raw = encode(ev)
    assert len(raw) == EVENT_SIZE
    assert decode(raw) == ev
    ev4 = sample_event(family=AF_INET, laddr=synthetic.addr("10.0.0.1"), raddr=synthetic.addr("10.0.0.2"),
                       type="state", hook="tp_set_state", oldstate=2, newstate=1, comm="")
    assert decode(encode(ev4)) == ev4


def test_encode_decode_every_type_and_hook():
    for etype in EVENT_TYPES.values():
        for hook in HOOKS.values():
            ev = sample_event(type=etype, hook=hook)
            assert decode(encode(ev)) == ev


def test_decode_truncates_comm_at_nul_and_ignores_trailing_bytes():
    raw = encode(sample_event(comm="ksoftirqd/0"))
    back = decode(raw + b"\xaa\xbb\xcc\xdd")  # perf records come padded (132 bytes for 128)
    assert back.comm == "ksoftirqd/0"
    assert decode(encode(sample_event(comm="a-very-long-command-name"))).comm == "a-very-long-com"  # 15 + NUL


@pytest.mark.parametrize("name", synthetic.FIXTURES)
def test_fixture_records_decode(name):
    fx = synthetic.load_fixture(name)
    family = AF_INET6 if "ipv6" in name else AF_INET
    events = [decode(bytes.fromhex(r)) for r in fx["records"]]
    assert len(events) == len(fx["records"]) >= 8
    for ev in events:
        assert ev.family == family
        assert {ev.lport, ev.rport} == {12345, 39836}
        assert ev.type in EVENT_TYPES.values()
        assert ev.oldstate in synthetic.fixture_states(fx)
    first = min(events, key=lambda e: e.ts_ns)
    assert first.type == "syn_challenged"
    assert first.lport == 12345 and first.rport == 39836
    expected = "127.0.0.1" if family == AF_INET else "[::1]"
    assert first.local == f"{expected}:12345"
    assert first.remote == f"{expected}:39836"
    assert synthetic.fixture_states(fx)[first.oldstate] == "CLOSE_WAIT"


@pytest.mark.parametrize("name", synthetic.FIXTURES)
def test_fixture_records_reencode(name):
    for r in synthetic.load_fixture(name)["records"]:
        raw = bytes.fromhex(r)
        assert encode(decode(raw)) == raw[:EVENT_SIZE]


def test_decode_rejects_short_records():
    raw = encode(sample_event())
    for n in (0, 1, EVENT_SIZE // 2, EVENT_SIZE - 1):
        with pytest.raises(DecodeError, match="bytes"):
            decode(raw[:n])


@pytest.mark.parametrize("value", [0, 9, 99, 0xFFFFFFFF])
def test_decode_rejects_unknown_type(value):
    assert value not in EVENT_TYPES
    with pytest.raises(DecodeError, match="type"):
        decode(patch_u(encode(sample_event()), "type", value))


@pytest.mark.parametrize("value", [0, 1, 3, 11, 0xFFFF])
def test_decode_rejects_unknown_family(value):
    with pytest.raises(DecodeError, match="family"):
        decode(patch_u(encode(sample_event()), "family", value))


def test_decode_keeps_unknown_hook_visible():
    ev = decode(patch_u(encode(sample_event()), "hook", 77))
    assert ev.hook == "hook77"


# -- addresses and flags ----------------------------------------------------------------


def test_format_addr_ipv4():
    assert format_addr(AF_INET, bytes([127, 0, 0, 1]), 12345) == "127.0.0.1:12345"
    assert format_addr(AF_INET, synthetic.addr("192.168.1.20"), 1) == "192.168.1.20:1"  # 16-byte buffer


def test_format_addr_ipv6():
    assert format_addr(AF_INET6, synthetic.addr("::1"), 12345) == "[::1]:12345"
    assert format_addr(AF_INET6, synthetic.addr("2001:db8:0:0:0:0:0:1"), 443) == "[2001:db8::1]:443"


def test_event_flags_and_endpoints():
    ev = sample_event(flags=FLAGS["TC_F_AGE_OBSERVED"] | FLAGS["TC_F_AGE_JIFFIES"])
    assert ev.has("TC_F_AGE_OBSERVED") and ev.has("TC_F_AGE_JIFFIES")
    assert not ev.has("TC_F_CHALLENGE_PASSED")
    assert ev.local == "[2001:db8::1]:12345"
    assert ev.remote == "[2001:db8::2]:39836"


# -- syn_age_ns: one attribute per meaning -------------------------------------------


def test_syn_stamp_decodes_to_syn_age_ns():
    ev = sample_event(type="client_challenged", flags=FLAGS["TC_F_SYN_STAMP"], syn_age_ns=36_000)
    back = decode(encode(ev))
    assert back == ev and back.syn_age_ns == 36_000 and back.observed_age_ns == 0


def test_legacy_observed_age_decodes_to_observed_age_ns_at_the_same_offset():
    # a recording of a version before 0.2: the same 8 bytes hold the socket's time in CLOSE_WAIT
    raw = patch_u(encode(sample_event(flags=FLAGS["TC_F_AGE_OBSERVED"])), "syn_age_ns", 1_056_280_577)
    ev = decode(raw)
    assert ev.observed_age_ns == 1_056_280_577 and ev.syn_age_ns == 0
    assert encode(ev) == raw
    assert offsets()["syn_age_ns"] == (16, 8)  # where age_ns was: recordings stay readable


@pytest.mark.parametrize("name", synthetic.FIXTURES)
def test_fixtures_are_legacy_recordings_with_an_observed_age(name):
    [ev] = [e for e in synthetic.fixture_events(synthetic.load_fixture(name)) if e.type == "syn_challenged"]
    assert ev.has("TC_F_AGE_OBSERVED") and 1e9 < ev.observed_age_ns < 1.1e9 and ev.syn_age_ns == 0
