"""The answers the running kernel's BTF gave, kept on disk, so that a start on
a kernel seen before parses no BTF (a tenth of a second of the start-up).

Every question the tracer asks BTF (a member's offset, an enum's value, a
function's presence, a tracepoint's prototype) is a pure function of the BTF
blob and of the reader (tracer/kernel/btf.py). `AnsweredBTF` stands in for a
BTF object: a question it has an answer for costs a dictionary lookup; any
other is asked of the real BTF, parsed then, and the answer is kept
(`save()` writes them once start-up has asked all it asks).

The file's name is a hash of the BTF blob, of the reader's source and of
this module's format, so answers cannot outlive the kernel or the code that
gave them. It lives beside the compiled objects (tracer/kernel/objcache.py),
under the same rules: root's, not writable by others, else not read; a file
that does not parse is ignored and written again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from tracer.kernel import btf as btf_module
from tracer.kernel import objcache
from tracer.kernel.btf import BTF

FORMAT = 1
# the questions asked at start-up (offsets.py, hooks.py, program.py); their answers are JSON values
QUESTIONS = frozenset({"member_offset", "member_size", "member_bit_offset", "has_member", "enum_value",
                       "enum_values", "has_func", "tracepoint_args", "find_type_ids", "struct_size"})


def _question(method: str, args: tuple) -> str:
    return json.dumps([method, [sorted(a) if isinstance(a, (set, frozenset)) else a for a in args]])


class AnsweredBTF:
    """A BTF object's questions, answered from disk where they were asked
    before on the same blob."""

    def __init__(self, data: bytes, answers: dict[str, object] | None, path: Path | None):
        self._data = data
        self._answers = dict(answers or {})
        self._path = path
        self._real: BTF | None = None
        self.fresh = False  # answers not on disk yet
        if answers is None:  # nothing known: parse now, so a bad blob fails where BTF.load would
            self.real()

    def real(self) -> BTF:
        if self._real is None:
            self._real = BTF.from_bytes(self._data)
        return self._real

    @property
    def parsed(self) -> bool:
        return self._real is not None

    def __getattr__(self, name: str):
        if name not in QUESTIONS:
            return getattr(self.real(), name)

        def ask(*args):
            q = _question(name, args)
            if q in self._answers:
                value = self._answers[q]
                if isinstance(value, dict) and "raises" in value:
                    raise btf_module.BTFError(value["raises"])
                return value
            try:
                value = getattr(self.real(), name)(*args)
            except btf_module.BTFError as e:  # a missing member is an answer too
                self._answers[q] = {"raises": str(e)}
                self.fresh = True
                raise
            self._answers[q] = value
            self.fresh = True
            return value

        return ask

    def save(self) -> None:
        """Write the answers gathered (best effort: a cache that cannot be
        written costs the next start a parse, nothing else)."""
        if not self.fresh or self._path is None:
            return
        with contextlib.suppress(OSError):
            if objcache.write(self._path, json.dumps({"format": FORMAT, "answers": self._answers}).encode()) is None:
                self.fresh = False


def _reader_digest() -> str:
    """The reader's source and this format: answers from other code are not reused."""
    h = hashlib.sha256(f"format {FORMAT}".encode())
    with contextlib.suppress(OSError, TypeError):
        h.update(Path(btf_module.__file__).read_bytes())
    return h.hexdigest()


def load(path: str) -> AnsweredBTF:
    """The BTF at `path` (raw or inside an ELF file), answering from disk what
    was asked of the same blob before."""
    data = BTF.read_blob(path)
    where = objcache.cache_dir()
    if where is None:
        return AnsweredBTF(data, None, None)
    digest = hashlib.sha256(data + _reader_digest().encode()).hexdigest()
    file = where / f"btf-{digest}.json"
    answers = None
    if file.exists() and objcache.untrusted(where) is None and objcache.untrusted(file) is None:
        try:
            saved = json.loads(file.read_bytes())
            if saved.get("format") == FORMAT and isinstance(saved.get("answers"), dict):
                answers = saved["answers"]
        except (OSError, ValueError, AttributeError):
            answers = None
    return AnsweredBTF(data, answers, file)
