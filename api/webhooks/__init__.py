"""Signed webhooks (issue 13, section 3): events, the outbox, the address guard and the deliverer.

``outbox`` is imported by the worker (torch-free, no HTTP client); ``deliverer`` runs in the API.
"""
