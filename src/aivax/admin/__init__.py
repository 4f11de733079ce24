"""The operator surface: `/admin` endpoints and admin tokens."""
