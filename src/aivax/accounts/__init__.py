"""Accounts: identity, plan membership, status, settings."""
