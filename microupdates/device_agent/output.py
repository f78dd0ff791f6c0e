"""Bounded capture of a process's output: the first and the last bytes, with the cut marked."""

from __future__ import annotations

import logging
import threading
from typing import Tuple

from microupdates.protocol.device_api import MAX_REPORTED_OUTPUT_BYTES, StageReport

logger = logging.getLogger(__name__)

DEFAULT_HEAD_BYTES = 32 * 1024
DEFAULT_TAIL_BYTES = 32 * 1024

# Room kept free in the tail for the cut marker, so the rendered text stays
# within head_bytes + tail_bytes when encoded as UTF-8.
CUT_MARKER_RESERVE_BYTES = 64


def format_cut_marker(cut_bytes: int) -> str:
    """Return the line that replaces `cut_bytes` bytes left out of the middle of the output."""

    return f"\n[... {cut_bytes} bytes cut ...]\n"


def decode_output(data: bytes) -> str:
    """Decode process output as UTF-8, writing invalid bytes as `\\xNN` escapes."""

    return data.decode("utf-8", errors="backslashreplace")


def _decode_within(data: bytes, budget: int, keep_end: bool) -> Tuple[str, int]:
    """Decode the longest prefix (or suffix, with keep_end) of data whose text fits in budget UTF-8 bytes.

    Escapes for invalid bytes take four characters per byte, so text decoded
    from binary output can be larger than the bytes it came from. Returns the
    text and the number of bytes of data it covers.
    """

    text = decode_output(data)
    if len(text.encode("utf-8")) <= budget:
        return text, len(data)

    # The encoded size of a prefix grows with its length except around split
    # multi-byte characters, so a binary search finds a prefix close to the
    # largest that fits.
    low, high = 0, min(len(data), budget)
    while low < high:
        middle = (low + high + 1) // 2
        part = data[len(data) - middle:] if keep_end else data[:middle]
        if len(decode_output(part).encode("utf-8")) <= budget:
            low = middle
        else:
            high = middle - 1

    part = data[len(data) - low:] if keep_end else data[:low]
    return decode_output(part), low


class BoundedOutput:
    """Process output kept as its first `head_bytes` and last `tail_bytes` bytes.

    Chunks come in with `write()`, usually from a reader thread, while other
    threads may call `tail()` for progress reports, so every method takes a lock.
    """

    def __init__(self, head_bytes: int = DEFAULT_HEAD_BYTES, tail_bytes: int = DEFAULT_TAIL_BYTES) -> None:
        if head_bytes < 0 or tail_bytes <= CUT_MARKER_RESERVE_BYTES:
            raise ValueError(
                f"head_bytes must be >= 0 and tail_bytes > {CUT_MARKER_RESERVE_BYTES}, "
                f"got {head_bytes} and {tail_bytes}"
            )
        if head_bytes + tail_bytes > MAX_REPORTED_OUTPUT_BYTES:
            raise ValueError(
                f"head_bytes + tail_bytes is {head_bytes + tail_bytes}, "
                f"over the reported output limit of {MAX_REPORTED_OUTPUT_BYTES} bytes"
            )

        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self._head = bytearray()
        self._tail = bytearray()
        self._total_bytes = 0
        self._lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        """Add a chunk of output; bytes between the head and the last tail_bytes are dropped."""

        with self._lock:
            self._total_bytes += len(chunk)

            head_room = self.head_bytes - len(self._head)
            if head_room > 0:
                self._head += chunk[:head_room]
                chunk = chunk[head_room:]

            self._tail += chunk
            # Trimming only once the buffer contains twice the tail keeps the
            # copying cost per written byte constant.
            if len(self._tail) > 2 * self.tail_bytes:
                del self._tail[: len(self._tail) - self.tail_bytes]

    @property
    def total_bytes(self) -> int:
        """Number of bytes written so far, kept or not."""

        with self._lock:
            return self._total_bytes

    @property
    def truncated(self) -> bool:
        """Whether `render()` leaves some output out of the middle."""

        return self._render()[1] > 0

    def tail(self, max_bytes: int) -> str:
        """Return the last max_bytes bytes of output as text, for progress reports.

        At most tail_bytes bytes are available once the output has been cut.
        """

        with self._lock:
            if self._total_bytes <= self.head_bytes + self.tail_bytes:
                data = bytes(self._head) + bytes(self._tail)
            else:
                data = bytes(self._tail[-self.tail_bytes:])
        if max_bytes <= 0:
            return ""
        return decode_output(data[-max_bytes:])

    def render(self) -> str:
        """Return the kept output as text, with a marker line where bytes were cut.

        The UTF-8 encoding of the result is at most head_bytes + tail_bytes
        bytes, the marker included. When escapes for invalid bytes would make
        the text larger, fewer bytes are shown and the marker counts them as cut.
        """

        return self._render()[0]

    def _render(self) -> Tuple[str, int]:
        """Return the rendered text and the number of output bytes it leaves out."""

        with self._lock:
            head = bytes(self._head)
            total = self._total_bytes
            if total <= self.head_bytes + self.tail_bytes:
                tail = bytes(self._tail)
            else:
                tail = bytes(self._tail[-self.tail_bytes:])

        if total <= self.head_bytes + self.tail_bytes:
            text = decode_output(head + tail)
            if len(text.encode("utf-8")) <= self.head_bytes + self.tail_bytes:
                return text, 0

        head_text, head_used = _decode_within(head, self.head_bytes, keep_end=False)
        tail_text, tail_used = _decode_within(tail, self.tail_bytes - CUT_MARKER_RESERVE_BYTES, keep_end=True)
        cut_bytes = total - head_used - tail_used
        return head_text + format_cut_marker(cut_bytes) + tail_text, cut_bytes


def shrink_report(report: StageReport, max_step_output_bytes: int) -> StageReport:
    """Return a copy of the report whose step outputs keep at most their last max_step_output_bytes bytes.

    Each cut output starts with a marker line and sets output_truncated, so
    the operator sees that output is missing. The agent sends this copy when
    the API rejects the full report as too large (HTTP 413).
    """

    steps = []
    for step in report.steps:
        data = step.output.encode("utf-8", "surrogatepass")
        if len(data) <= max_step_output_bytes:
            steps.append(step)
            continue
        kept = decode_output(data[len(data) - max_step_output_bytes:]) if max_step_output_bytes > 0 else ""
        marker = format_cut_marker(len(data) - max_step_output_bytes).lstrip("\n")
        steps.append(step.model_copy(update={"output": marker + kept, "output_truncated": True}))
    return report.model_copy(update={"steps": steps})
