"""Tenants, their API keys, and the ledger that holds their limits exactly across replicas.

Shared by the gateway (keys, requests per minute, concurrent streams) and dialogue (tokens and
spend, reserved before the model call and settled after it).
"""
