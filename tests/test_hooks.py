"""Hook selection on synthetic kernel offers (no root, no BPF): what each kind
of kernel gets, forced backends, and replacing a hook that never fired.
Also: every candidate names macros, counters and functions the BPF sources
really have."""

from __future__ import annotations

import re

import pytest

from tracer.kernel import hooks, capabilities
from tracer.pipeline.events import ENUMS
from tracer.resources import bpf_dir

ALL_TP_FIELDS = {
    "sock:inet_sock_set_state": ["skaddr", "oldstate", "newstate", "protocol"],
    "skb:kfree_skb": ["skbaddr", "location", "rx_sk", "protocol", "reason"],
    "tcp:tcp_send_reset": ["skbaddr", "skaddr"],
    "tcp:tcp_receive_reset": ["skaddr"],
    "tcp:tcp_retransmit_skb": ["skbaddr", "skaddr", "state"],
}
FUNCS = {"tcp_set_state", "tcp_rcv_state_process", "tcp_send_challenge_ack", "tcp_v4_connect", "tcp_v6_connect",
         "inet_csk_reqsk_queue_add", "inet_csk_complete_hashdance"}


def offer(tp_fields=ALL_TP_FIELDS, kprobes=True, fentry=True, syms=None, btf_funcs=FUNCS) -> hooks.Offer:
    o = hooks.Offer()
    o.formats = {name: capabilities.TracepointFormat(name, {f: "int" for f in fields}) for name, fields in tp_fields.items()}
    o.kprobes = kprobes
    o.kallsyms = {f: f for f in FUNCS} if syms is None else syms
    o.btf_funcs = set(btf_funcs)
    o.fentry = fentry
    o.fentry_note = "" if fentry else "loading an fentry program fails here (EPERM)"
    return o


def backends(plan: hooks.Plan) -> dict[str, str | None]:
    return {c.logical: (c.candidate.name if c.candidate else None) for c in plan.choices}


def test_distribution_kernel_gets_fentry_for_the_design_card_hooks():
    plan = hooks.select(offer())
    got = backends(plan)
    assert got["set_state"] == "fentry:tcp_set_state"
    assert got["syn_challenged"] == "fentry:tcp_rcv_state_process"
    assert got["challenge_ack"] == "fentry:tcp_send_challenge_ack"
    assert got["connect"] == "fentry:tcp_v4_connect+tcp_v6_connect"
    assert got["queued"] == "fentry:inet_csk_reqsk_queue_add"
    assert got["send_reset"] == "tracepoint:tcp:tcp_send_reset"
    assert plan.backend == "fentry"
    assert plan.defines()["TC_USE_FE_SET_STATE"] == 1 and "TC_USE_TP_SET_STATE" not in plan.defines()
    assert plan.kprobes() == []


def test_this_machine_tracepoints_only():
    plan = hooks.select(offer(kprobes=False, fentry=False))
    got = backends(plan)
    assert got["set_state"] == "tracepoint:sock:inet_sock_set_state"
    assert got["syn_challenged"] == "tracepoint:skb:kfree_skb"
    assert got["queued"] is None and "deduced" in plan.choice("queued").note
    assert got["connect"] is None
    assert plan.backend == "tracepoint"


def test_old_kernel_without_rx_sk_and_without_kprobes_is_a_clear_error():
    fields = dict(ALL_TP_FIELDS, **{"skb:kfree_skb": ["skbaddr", "location", "protocol", "reason"]})
    with pytest.raises(hooks.BackendError, match="6.11"):
        hooks.select(offer(tp_fields=fields, kprobes=False, fentry=False))


def test_old_kernel_without_rx_sk_uses_kprobes():
    fields = dict(ALL_TP_FIELDS, **{"skb:kfree_skb": ["skbaddr", "location", "protocol", "reason"]})
    plan = hooks.select(offer(tp_fields=fields, fentry=False))
    assert backends(plan)["syn_challenged"] == "kprobe:tcp_rcv_state_process"


def test_kprobe_on_a_suffixed_symbol_and_the_hashdance_fallback():
    syms = {f: f for f in FUNCS if f != "inet_csk_reqsk_queue_add"}
    syms["tcp_send_challenge_ack"] = "tcp_send_challenge_ack.isra.0"
    plan = hooks.select(offer(fentry=False, syms=syms))
    assert backends(plan)["queued"] == "kprobe:inet_csk_complete_hashdance"
    assert ("kretprobe", "tcp_send_challenge_ack.isra.0", "tc_kretp_challenge") in plan.kprobes()
    assert "no symbol inet_csk_reqsk_queue_add" in plan.choice("queued").note


def test_a_silent_hook_is_replaced_by_the_next_candidate():
    o = offer(fentry=False)
    plan = hooks.select(o, exclude={"kprobe:inet_csk_reqsk_queue_add"})
    assert backends(plan)["queued"] == "kprobe:inet_csk_complete_hashdance"
    assert "attached but never fired" in plan.choice("queued").note


def test_forced_backends():
    o = offer()
    plan = hooks.select(o, "kprobe")
    got = backends(plan)
    assert got["set_state"] == "kprobe:tcp_set_state" and got["send_reset"] == "tracepoint:tcp:tcp_send_reset"
    plan = hooks.select(o, "tracepoint")
    assert backends(plan)["challenge_ack"] is None  # never silently a kprobe or fentry
    with pytest.raises(hooks.BackendError, match="no kprobes"):
        hooks.select(offer(kprobes=False), "kprobe")
    with pytest.raises(hooks.BackendError, match="EPERM"):
        hooks.select(offer(fentry=False), "fentry")
    with pytest.raises(hooks.BackendError, match="unknown backend"):
        hooks.select(o, "ebpf")


def test_resolve_symbols(tmp_path):
    ks = tmp_path / "kallsyms"
    ks.write_text(
        "ffffffff81000000 t tcp_send_challenge_ack.isra.0\n"
        "ffffffff81000100 t tcp_set_state.cold\n"
        "ffffffff81000200 T tcp_set_state\n"
        "ffffffff81000300 d tcp_v4_connect\n"
        "ffffffff81000400 T inet_csk_reqsk_queue_add\t[some_module]\n"
    )
    got = capabilities.resolve_symbols({"tcp_send_challenge_ack", "tcp_set_state", "tcp_v4_connect",
                                  "inet_csk_reqsk_queue_add"}, str(ks))
    assert got == {"tcp_send_challenge_ack": "tcp_send_challenge_ack.isra.0", "tcp_set_state": "tcp_set_state",
                   "inet_csk_reqsk_queue_add": "inet_csk_reqsk_queue_add"}


def test_candidates_match_the_bpf_sources():
    text = "".join(p.read_text() for p in bpf_dir().glob("*.bpf.[ch]"))
    defined = set(re.findall(r"^int\s+(tc_\w+)\(struct pt_regs", text, re.M))
    for cands in hooks.CANDIDATES.values():
        for c in cands:
            assert re.search(rf"\b{c.use}\b", text), f"{c.use} guards nothing in bpf/"
            assert c.hook in ENUMS["tc_hook"], c.hook
            assert re.search(rf"\b{c.hook}\b", text), f"no program increments {c.hook}"
            for _, _, fn in c.probes:
                assert fn in defined, fn


# Raw tracepoint arguments, as BTF spells the prototypes (without `void *__data`).
PROTOS_6_18 = {
    "sock:inet_sock_set_state": ["const struct sock *", "const int", "const int"],
    "skb:kfree_skb": ["struct sk_buff *", "void *", "enum skb_drop_reason", "struct sock *"],
    "tcp:tcp_send_reset": ["const struct sock *", "const struct sk_buff *", "const enum sk_rst_reason"],
    "tcp:tcp_receive_reset": ["struct sock *"],
    "tcp:tcp_retransmit_skb": ["const struct sock *", "const struct sk_buff *", "int"],
}


def test_raw_tracepoint_arguments_found_by_type():
    got = {t: hooks.raw_arg_positions(t, a) for t, a in PROTOS_6_18.items()}
    assert got["sock:inet_sock_set_state"] == {"SK": 0, "OLDSTATE": 1, "NEWSTATE": 2}
    assert got["skb:kfree_skb"] == {"SKB": 0, "REASON": 2, "RX_SK": 3}
    assert got["tcp:tcp_send_reset"] == {"SK": 0, "SKB": 1}
    # 6.1: tcp_send_reset(sk, skb) without a reason: the same positions
    assert hooks.raw_arg_positions("tcp:tcp_send_reset", ["const struct sock *", "const struct sk_buff *"]) == \
        {"SK": 0, "SKB": 1}


def test_raw_tracepoint_refused_when_absent_or_ambiguous():
    assert hooks.raw_arg_positions("tcp:tcp_receive_reset", None) is None  # no btf_trace_ typedef
    assert hooks.raw_arg_positions("tcp:tcp_receive_reset", ["struct sk_buff *"]) is None  # no socket
    # two sockets where one is wanted: which one is meant cannot be told
    assert hooks.raw_arg_positions("tcp:tcp_receive_reset", ["struct sock *", "struct sock *"]) is None
    assert hooks.raw_arg_positions("sock:inet_sock_set_state", ["const struct sock *", "int", "int", "int"]) is None


def test_plan_compiles_raw_tracepoints_only_where_the_prototype_is_known():
    o = offer(kprobes=False, fentry=False)
    o.raw_args = {t: hooks.raw_arg_positions(t, a) for t, a in PROTOS_6_18.items() if t != "tcp:tcp_receive_reset"}
    plan = hooks.select(o)
    d = plan.defines()
    assert d["TC_RAW_INET_SOCK_SET_STATE"] == 1 and d["TC_RAW_INET_SOCK_SET_STATE_NEWSTATE"] == 2
    assert d["TC_RAW_KFREE_SKB_RX_SK"] == 3
    assert "TC_RAW_TCP_RECEIVE_RESET" not in d
    attach = {c.logical: c.as_dict()["attach"] for c in plan.choices}
    assert attach["set_state"] == "raw_tracepoint" and attach["receive_reset"] == "tracepoint"
    assert attach["connect"] is None
    fe = {c.logical: c.as_dict()["attach"] for c in hooks.select(offer()).choices}
    assert fe["set_state"] == "fentry/fexit"


def test_every_raw_argument_is_used_by_the_bpf_sources():
    text = (bpf_dir() / "tracepoints.bpf.c").read_text()
    for target, args in hooks.RAW_ARGS.items():
        event = target.split(":")[1].upper()
        assert re.search(rf"#ifdef TC_RAW_{event}\b", text), event
        for name, _, _ in args:
            assert re.search(rf"TC_RAW_ARG\({event}, {name}\)", text), (event, name)


# Debian 11's 5.10: kfree_skb has neither reason nor rx_sk; tcp_send_challenge_ack
# is static and absent from BTF, but kallsyms has it (a kprobe can take it).
FIELDS_5_10 = dict(ALL_TP_FIELDS, **{"skb:kfree_skb": ["skbaddr", "location", "protocol"]})
FUNCS_5_10 = FUNCS - {"tcp_send_challenge_ack"}


def test_5_10_gets_fentry_and_a_kprobe_for_the_challenge_ack():
    plan = hooks.select(offer(tp_fields=FIELDS_5_10, btf_funcs=FUNCS_5_10))
    got = backends(plan)
    assert got["syn_challenged"] == "fentry:tcp_rcv_state_process"
    assert got["challenge_ack"] == "kprobe:tcp_send_challenge_ack"
    assert plan.backend == "fentry" and plan.defines()["TC_USE_CHALLENGE"] == 1


def test_5_10_forced_fentry_judges_the_challenge_ack_at_the_return_of_tcp_rcv_state_process():
    plan = hooks.select(offer(tp_fields=FIELDS_5_10, btf_funcs=FUNCS_5_10), "fentry")
    got = backends(plan)
    assert got["challenge_ack"] == "fentry:tcp_rcv_state_process@return"
    d = plan.defines()
    assert d["TC_USE_FE_CHALLENGE_RCV"] == 1 and d["TC_USE_CHALLENGE"] == 1 and "TC_USE_KP_CHALLENGE" not in d
    # that return needs the fentry entry hook: with syn_challenged on a kprobe it is refused
    plan = hooks.select(offer(tp_fields=FIELDS_5_10, btf_funcs=FUNCS_5_10),
                        exclude={"fentry:tcp_rcv_state_process"})
    got = backends(plan)
    assert got["syn_challenged"] == "kprobe:tcp_rcv_state_process"
    assert got["challenge_ack"] == "kprobe:tcp_send_challenge_ack"


def test_5_10_tracepoints_alone_cannot_see_the_collision():
    with pytest.raises(hooks.BackendError, match="5.17"):
        hooks.select(offer(tp_fields=FIELDS_5_10, btf_funcs=FUNCS_5_10), "tracepoint")
