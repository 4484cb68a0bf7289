"""Webhooks following the Standard Webhooks specification: registration, signed delivery with retries, dead letters."""
