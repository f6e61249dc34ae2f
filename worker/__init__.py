"""Celery worker running compression jobs, one per process (``-P prefork -c 1`` per GPU)."""
