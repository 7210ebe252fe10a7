"""Bytes on sockets: HTTP/1.1 framing and the keep-alive client to a child."""
