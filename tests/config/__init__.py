"""Tests of gateway/config: loading and validating the file, TLS settings."""
