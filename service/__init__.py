"""KegNet compression service: a FastAPI API in front of a Celery worker, with job state in Redis."""
