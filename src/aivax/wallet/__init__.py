"""Wallet: integer micro-units in an append-only ledger; holds, settlement, the reaper."""
