"""The operator surface: `/admin` endpoints (operator tokens are checked by `auth`)."""
