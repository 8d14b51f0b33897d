"""Policy: who may call what. Client keys, methods, paths, origins, headers, models, limit rules.

Plain Python rules with no Flask imports, testable with plain strings and bytes.
May import: ``gateway.errors`` only.
"""
