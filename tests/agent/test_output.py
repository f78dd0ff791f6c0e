from __future__ import annotations

import pytest

from microupdates.device_agent.output import BoundedOutput, format_cut_marker
from microupdates.protocol.device_api import MAX_REPORTED_OUTPUT_BYTES


def test_output_short_is_kept_whole():
    output = BoundedOutput(head_bytes=100, tail_bytes=100)

    output.write(b"hello ")
    output.write(b"world\n")

    assert output.render() == "hello world\n"
    assert output.truncated is False
    assert output.total_bytes == 12


def test_output_exactly_at_limit_is_not_cut():
    output = BoundedOutput(head_bytes=100, tail_bytes=100)

    output.write(b"a" * 200)

    assert output.render() == "a" * 200
    assert output.truncated is False


def test_output_over_limit_keeps_head_and_tail():
    output = BoundedOutput(head_bytes=100, tail_bytes=100)
    data = b"H" * 100 + b"M" * 5000 + b"T" * 100

    for start in range(0, len(data), 7):
        output.write(data[start:start + 7])

    # 64 bytes of the tail make room for the marker, so 36 of the 100 kept are shown.
    assert output.truncated is True
    assert output.render() == "H" * 100 + format_cut_marker(5064) + "T" * 36


def test_output_render_fits_head_plus_tail():
    output = BoundedOutput()

    output.write(b"x" * (3 * MAX_REPORTED_OUTPUT_BYTES))

    assert len(output.render().encode("utf-8")) <= MAX_REPORTED_OUTPUT_BYTES


def test_output_invalid_utf8_is_escaped():
    output = BoundedOutput(head_bytes=100, tail_bytes=100)

    output.write(b"ok \xff\xfe \xc3\xa9")

    assert output.render() == "ok \\xff\\xfe \u00e9"


def test_output_escapes_cannot_exceed_limit():
    output = BoundedOutput(head_bytes=100, tail_bytes=100)

    output.write(b"\xff" * 150)

    rendered = output.render()
    assert len(rendered.encode("utf-8")) <= 200
    assert output.truncated is True
    assert "bytes cut" in rendered


def test_output_tail_returns_last_bytes():
    output = BoundedOutput(head_bytes=100, tail_bytes=100)

    output.write(b"0123456789")
    assert output.tail(4) == "6789"

    output.write(b"a" * 1000 + b"end")
    assert output.tail(5) == "aaend"
    assert output.tail(0) == ""


def test_output_rejects_sizes_over_report_limit():
    with pytest.raises(ValueError, match="over the reported output limit"):
        BoundedOutput(head_bytes=MAX_REPORTED_OUTPUT_BYTES, tail_bytes=1024)
