"""Tests of gateway/commands: check-config, keys, explain."""
