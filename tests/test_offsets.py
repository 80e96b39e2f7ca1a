"""The one list of kernel fields and enums, fed from the running kernel's BTF
(no root needed) or from a header tree (a synthetic tcp_states.h here)."""

from pathlib import Path

import pytest

from tracer.kernel import offsets
from tracer.kernel.btf import BTF, BTFError

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
pytestmark = pytest.mark.skipif(not BTF_PATH.exists(), reason="no kernel BTF")

TCP_STATES_H = """\
enum {
\tTCP_ESTABLISHED = 1,
\tTCP_SYN_SENT,
\tTCP_SYN_RECV,
\tTCP_FIN_WAIT1,
\tTCP_FIN_WAIT2,
\tTCP_TIME_WAIT,
\tTCP_CLOSE,
\tTCP_CLOSE_WAIT,
\tTCP_LAST_ACK,
\tTCP_LISTEN,
\tTCP_CLOSING,\t/* Now a valid state */
\tTCP_NEW_SYN_RECV,
\tTCP_BOUND_INACTIVE, /* Pseudo-state for inet_bind_bucket */

\tTCP_MAX_STATES\t/* Leave at the end! */
};
"""


def test_btf_defines_every_macro():
    d = offsets.btf_defines(BTF.load())
    required = {f.macro for f in offsets.FIELDS} | {m for m, _, _ in offsets.ENUMS} | {offsets.SOCKET_INODE[0]}
    assert required <= set(d) and set(d) - required <= set(offsets.OPTIONAL_MACROS)
    assert d["K_TCP_CLOSE_WAIT"] == 8 and d["OFF_SKC_FAMILY"] > 0


def test_usec_ts_bitfield_byte_and_mask():
    """tp->tcp_usec_ts is a one-bit bitfield: the byte that holds it and the bit's mask."""
    btf = BTF.load()
    if not btf.has_member("tcp_sock", "tcp_usec_ts"):
        assert offsets.usec_ts_defines(btf) == {}
        return
    bit = btf.member_bit_offset("tcp_sock", "tcp_usec_ts")
    d = offsets.usec_ts_defines(btf)
    assert d["OFF_TP_USEC_TS"] * 8 + d["TC_TP_USEC_TS_MASK"].bit_length() - 1 == bit
    assert btf.member_type("tcp_sock", "tcp_usec_ts")


def test_header_defines_are_expressions_for_the_same_macros():
    h = offsets.header_defines()
    assert set(h) == set(offsets.btf_defines(BTF.load())) - set(offsets.OPTIONAL_MACROS)
    assert h["OFF_TP_SND_NXT"] == "__builtin_offsetof(struct tcp_sock, snd_nxt)"
    assert h["K_TCP_CLOSE_WAIT"] == "TCP_CLOSE_WAIT"


def test_header_tcp_states_match_btf(tmp_path):
    (tmp_path / "include" / "net").mkdir(parents=True)
    (tmp_path / "include" / "net" / "tcp_states.h").write_text(TCP_STATES_H)
    assert offsets.header_tcp_states([tmp_path / "include"]) == offsets.tcp_states(BTF.load())


def test_header_tcp_states_missing(tmp_path):
    with pytest.raises(offsets.OffsetError, match="tcp_states.h"):
        offsets.header_tcp_states([tmp_path / "include"])


def test_debian_split_header_tree(tmp_path):
    """Debian: build/ holds the arch part (include/generated, include/config),
    source/ the common headers (include/linux, include/net)."""
    from tracer.kernel import capabilities

    build, source = tmp_path / "build", tmp_path / "source"
    (build / "include" / "generated").mkdir(parents=True)
    (source / "include" / "linux").mkdir(parents=True)
    (source / "include" / "net").mkdir(parents=True)
    (source / "include" / "net" / "tcp_states.h").write_text(TCP_STATES_H)
    assert capabilities.header_include_dirs(build) == [source / "include"]
    assert offsets.header_tcp_states(capabilities.header_include_dirs(build))[8] == "CLOSE_WAIT"


# bcc's own uapi/linux/bpf.h copy can be older than the kernel's headers. The
# diagnostics below are clang's, as bcc 0.26 printed them against Debian's
# 6.12 headers (recorded in the kernel matrix); the uapi file is synthetic.
BPF_WQ_DIAG = """\
include/linux/bpf.h:368:10: error: invalid application of 'sizeof' to an incomplete type 'struct bpf_wq'
include/linux/bpf.h:402:10: error: invalid application of '__alignof' to an incomplete type 'struct bpf_wq'
"""
UAPI_BPF_H = """\
struct bpf_timer {
	__u64 __opaque[2];
} __attribute__((aligned(8)));

struct bpf_wq {
	__u64 __opaque[2];
} __attribute__((aligned(8)));
"""


def test_missing_uapi_structs_taken_from_the_kernel_headers(tmp_path):
    from tracer.kernel.program import _missing_uapi_structs
    (tmp_path / "uapi" / "linux").mkdir(parents=True)
    (tmp_path / "uapi" / "linux" / "bpf.h").write_text(UAPI_BPF_H)
    extra = _missing_uapi_structs(BPF_WQ_DIAG, [tmp_path / "nowhere", tmp_path])
    assert "struct bpf_wq {\n\t__u64 __opaque[2];\n} __attribute__((aligned(8)));" in extra
    assert "bpf_timer" not in extra
    assert extra.count("struct bpf_wq {") == 1


def test_missing_uapi_structs_gives_up_honestly(tmp_path):
    from tracer.kernel.program import _missing_uapi_structs
    (tmp_path / "uapi" / "linux").mkdir(parents=True)
    (tmp_path / "uapi" / "linux" / "bpf.h").write_text(UAPI_BPF_H)
    assert _missing_uapi_structs("error: unknown type name 'foo'", [tmp_path]) == ""
    assert _missing_uapi_structs(BPF_WQ_DIAG.replace("bpf_wq", "bpf_task_work"), [tmp_path]) == ""
    assert _missing_uapi_structs(BPF_WQ_DIAG, [tmp_path / "nowhere"]) == ""


def test_program_text_inlines_every_shared_file():
    # bcc rewrites map operations only in the main translation unit: every
    # *.bpf.[ch] under bpf/ is inlined, however deep its include
    import re

    from tracer.kernel.program import MAIN_SOURCE, _inline_local_includes
    from tracer.resources import bpf_dir

    text = _inline_local_includes(bpf_dir() / MAIN_SOURCE)
    assert not re.search(r'^\s*#include\s+"[\w./]+\.bpf\.[ch]"', text, re.M)
    files = {p.relative_to(bpf_dir()).as_posix() for p in bpf_dir().rglob("*.bpf.[ch]")}
    assert {"collide/maps.bpf.h", "collide/server.bpf.h", "collide/client.bpf.h"} <= files
    assert set(re.findall(r'^#line 1 "([^"]+)"$', text, re.M)) == files
    assert text.count("BPF_PERF_OUTPUT(events);") == 1


def test_program_text_refuses_an_include_loop(tmp_path):
    from tracer.kernel.program import BuildError, _inline_local_includes

    (tmp_path / "a.bpf.c").write_text('#include "sub/b.bpf.h"\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bpf.h").write_text('int b;\n#include "../a.bpf.c"\n')
    with pytest.raises(BuildError, match="includes itself"):
        _inline_local_includes(tmp_path / "a.bpf.c")


class _BTFWithout:
    """The host's BTF less one enum (as Linux 5.10's BTF has no enum skb_drop_reason)."""

    def __init__(self, btf, enum):
        self._btf, self._enum = btf, enum

    def enum_value(self, name, enum=None):
        if enum == self._enum:
            raise BTFError(f"no enum named {enum!r} in BTF")
        return self._btf.enum_value(name, enum)

    def __getattr__(self, name):
        return getattr(self._btf, name)


def test_a_kernel_without_drop_reasons_still_gets_every_other_macro():
    """5.10: no enum skb_drop_reason. Its macro is left undefined (the BPF side
    refuses the one hook that needs it); every other macro is there."""
    d = offsets.btf_defines(_BTFWithout(BTF.load(), "skb_drop_reason"))
    assert "K_SKB_DROP_REASON_TCP_INVALID_SYN" not in d
    assert "K_TCP_CLOSE_WAIT" in d and "OFF_TP_SND_NXT" in d


def test_a_missing_required_enum_is_still_an_error():
    with pytest.raises(offsets.OffsetError, match="no enum"):
        offsets.btf_defines(_BTFWithout(BTF.load(), None))
