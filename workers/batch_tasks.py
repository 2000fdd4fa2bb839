"""Batch-lane Celery tasks (filled in by the batch lane)."""
