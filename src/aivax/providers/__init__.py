"""Upstream adapters. Each translates a chat request to its wire format and its responses into
the typed events of `base`; streamed and non-streamed calls share that one event path."""
