"""Serving side: admission controller, its compiled gate, request validation, conformal factors, load generator."""
