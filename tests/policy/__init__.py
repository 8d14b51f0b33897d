"""Tests of gateway/policy: paths, keys, headers, the egress guard, hostile input."""
