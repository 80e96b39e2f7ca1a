"""tracer/output/stream.py: standard output that never blocks the tracing loop."""

from __future__ import annotations

import os

import pytest

from tracer.output.stream import OutputClosed, Stdout


def pipe_stream(backlog: int):
    r, w = os.pipe()
    warnings: list[str] = []
    return r, w, Stdout(w, backlog=backlog, warn=warnings.append), warnings


def test_a_reader_that_does_not_read_gets_whole_records_and_a_count_of_the_rest():
    r, w, out, warnings = pipe_stream(backlog=100_000)
    try:
        line = "x" * 999 + "\n"
        for _ in range(400):  # 400 kB: the pipe's 64 KiB, the backlog, then drops
            out.write(line)
            out.flush()  # never blocks
        assert out.dropping and out.dropped()["records"] > 0 and len(warnings) == 1
        out.keep_next()
        out.write("summary\n")
        got = b""
        while out.waiting:
            got += os.read(r, 1 << 20)
            out.flush()
        got += os.read(r, 1 << 20)
        lines = got.decode().splitlines()
        assert all(x == line[:-1] for x in lines[:-1]) and lines[-1] == "summary"
        assert len(lines) - 1 + out.dropped()["records"] == 400
    finally:
        os.close(r)
        os.close(w)


def test_a_reader_that_went_away_is_said_once_and_then_nothing_is_written():
    r, w, out, _ = pipe_stream(backlog=1000)
    os.close(r)
    out.write("a record\n")
    with pytest.raises(OutputClosed):
        out.flush()
    out.write("more\n")
    out.flush()
    out.finish()
    os.close(w)
