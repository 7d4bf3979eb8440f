"""Unit tests of the pure logic that the end-to-end suites reach only through a whole tunnel.

Real objects throughout; where a test needs a tunnel's socket it uses ``framesockets``, the
project's own in-memory pair of frame sockets. Each test here takes milliseconds.
"""
