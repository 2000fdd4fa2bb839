"""Stream-lane Celery tasks (filled in by the stream lane)."""
