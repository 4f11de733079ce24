"""API keys: private (`aivax_sk_…`) and public (`aivax_pk_…`), stored only as HMAC."""
