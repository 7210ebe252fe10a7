"""The chunk scanner the fast path relays llama-server's answers with (``swapd.net.wire``).

It must find the exact end of a chunked body however the bytes are split into reads,
decode the same payload h11 does, and refuse malformed framing rather than relay past it.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapd.net.wire import ChunkScanner, FramingError, chunk, response_head


def h11_chunked(pieces: list[bytes], trailers: list[tuple[bytes, bytes]]) -> bytes:
    """A chunked body as h11 (the reference) writes it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")]))
    body = b"".join(conn.send(h11.Data(data=piece)) or b"" for piece in pieces if piece)
    return body + (conn.send(h11.EndOfMessage(headers=trailers)) or b"")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)
            if data[a:b]]


pieces = st.lists(st.binary(min_size=1, max_size=300), max_size=12)
trailer_sets = st.lists(st.tuples(st.sampled_from([b"x-a", b"x-b"]),
                                  st.binary(min_size=1, max_size=10).filter(
                                      lambda v: v.isalnum())), max_size=2)


@settings(max_examples=300, deadline=None)
@given(pieces, trailer_sets, st.lists(st.integers(0, 5000), max_size=20),
       st.binary(max_size=40))
def test_the_end_of_a_chunked_body_is_found_however_it_is_read(
        payload: list[bytes], trailers: list[tuple[bytes, bytes]], cuts: list[int],
        after: bytes) -> None:
    body = h11_chunked(payload, trailers)
    scanner = ChunkScanner()
    relayed = b""
    for read in split(body + after, cuts):
        if scanner.done:
            break
        used = scanner.scan(read, decode=True)
        relayed += read[:used]
        if not scanner.done:
            assert used == len(read)
    assert scanner.done
    assert relayed == body  # to the byte: nothing of what follows is taken
    assert b"".join(scanner.payload) == b"".join(payload)


def test_chunk_sizes_in_either_case_and_extensions_are_read() -> None:
    scanner = ChunkScanner()
    body = b"A;name=value\r\n" + b"x" * 10 + b"\r\nf\r\n" + b"y" * 15 + b"\r\n0\r\n\r\n"
    assert scanner.scan(body, decode=True) == len(body)
    assert b"".join(scanner.payload) == b"x" * 10 + b"y" * 15


@pytest.mark.parametrize("body", [
    b"zz\r\nxx\r\n0\r\n\r\n",            # not hex
    b"-1\r\nx\r\n0\r\n\r\n",             # a sign
    b"\r\n0\r\n\r\n",                    # no size at all
    b"2\r\nxxy\r\n0\r\n\r\n",            # data longer than its size
    b"2\nxx\r\n0\r\n\r\n",               # a bare LF after the size
    b"1" * 5000 + b"\r\n",               # a size line too long to be one
])
def test_malformed_framing_is_an_error_not_a_guess(body: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkScanner().scan(body)


def test_a_size_line_split_across_reads_is_kept_until_it_ends() -> None:
    scanner = ChunkScanner()
    assert scanner.scan(b"1") == 1 and not scanner.done
    assert not scanner.at_boundary  # half a size line: nothing may be inserted here
    assert scanner.scan(b"0\r\n" + b"z" * 16 + b"\r\n", decode=True) == 21
    assert scanner.at_boundary
    assert scanner.scan(b"0\r\n\r\n") == 5 and scanner.done
    assert scanner.payload == [b"z" * 16]


def test_frames_and_heads_swapd_writes_parse_as_http() -> None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"),
                                                               ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(response_head(418, [(b"transfer-encoding", b"chunked")])
                      + chunk(b"hello") + chunk(b"") + chunk(b" world") + b"0\r\n\r\n")
    response = conn.next_event()
    assert isinstance(response, h11.Response) and response.status_code == 418
    data = b""
    while isinstance(event := conn.next_event(), h11.Data):
        data += event.data
    assert data == b"hello world" and isinstance(event, h11.EndOfMessage)
