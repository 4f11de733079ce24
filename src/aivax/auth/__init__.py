"""Who is calling: the account-key middleware and the endpoint dependencies built on it."""
