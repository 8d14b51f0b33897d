"""Tests of gateway/spend: admission, stores, LLM calls and usage; live on SQLite and Redis."""
