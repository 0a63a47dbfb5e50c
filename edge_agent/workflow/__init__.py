"""Durable workflow steps: each work item's steps, timers and retries, decided and logged.

Imports only `domain`, `errors` and `clock`: the log it commits to is a protocol (`Ledger`).
"""
