"""Integrated models, operator credentials and accounts' bring-your-own-key credentials."""
