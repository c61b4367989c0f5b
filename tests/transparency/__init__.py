"""Differential transparency probes (issue 3): a preforked call against a direct run."""
