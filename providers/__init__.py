"""Delivery providers: one adapter per module, each behind the small interface of its channel."""
