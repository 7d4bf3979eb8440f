"""Tests of the sans-I/O tunnel protocol (rproxy_core.protocol)."""
