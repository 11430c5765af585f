"""Offline diagnostics of request logs and bucket tables (analyze, causes, compare, their plots): above estimator/ and serving/, never imported by the admission path."""
