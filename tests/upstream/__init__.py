"""Tests of gateway/upstream: the client, faults, resends, framing on pooled connections, TLS."""
