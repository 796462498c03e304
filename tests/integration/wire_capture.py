"""A TCP relay that records every byte crossing it, in both directions.

Privacy claims are tested as claims: put this between a node and the coordinator and look at
what the coordinator could have seen. gRPC here runs without TLS, so the recorded stream is
HTTP/2 frames carrying the protobuf messages as they are.
"""

from __future__ import annotations

import asyncio
import socket
import threading


class WireCapture:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.upstream = bytearray()    # client (node) -> server (coordinator)
        self.downstream = bytearray()  # server -> client
        #: the same bytes per TCP connection: (upstream, downstream), in accept order
        self.connections: list[tuple[bytearray, bytearray]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> WireCapture:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        connection = (bytearray(), bytearray())
        self.connections.append(connection)

        async def pump(src, dst, record: bytearray, own: bytearray) -> None:
            try:
                while data := await src.read(65536):
                    record.extend(data)
                    own.extend(data)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer, self.upstream, connection[0]),
                             pump(up_reader, writer, self.downstream, connection[1]))


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def grpc_messages(stream: bytes) -> list[bytes]:
    """The gRPC messages in one direction of one recorded plaintext HTTP/2 connection.

    Walks the HTTP/2 frames (9-byte headers), keeps DATA frames (type 0, minus padding),
    joins them per stream and splits each stream's data into gRPC length-prefixed messages
    (1 flag byte, 4 length bytes). Headers are skipped: only message bodies carry payloads.
    """
    if stream.startswith(H2_PREFACE):
        stream = stream[len(H2_PREFACE):]
    data: dict[int, bytearray] = {}
    at = 0
    while at + 9 <= len(stream):
        length = int.from_bytes(stream[at:at + 3], "big")
        kind, flags = stream[at + 3], stream[at + 4]
        stream_id = int.from_bytes(stream[at + 5:at + 9], "big") & 0x7FFFFFFF
        body = stream[at + 9:at + 9 + length]
        at += 9 + length
        if kind != 0:
            continue
        if flags & 0x8:  # PADDED
            body = body[1:len(body) - body[0]]
        data.setdefault(stream_id, bytearray()).extend(body)
    messages = []
    for joined in data.values():
        pos = 0
        while pos + 5 <= len(joined):
            size = int.from_bytes(joined[pos + 1:pos + 5], "big")
            messages.append(bytes(joined[pos + 5:pos + 5 + size]))
            pos += 5 + size
    return messages
