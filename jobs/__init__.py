"""The job domain, shared by the HTTP API (``service/``) and the Celery worker (``worker/``).

A job is a stored request to compress one model: its spec (``schemas.JobRequest``), its uploaded files
(``storage``), its state, events, caps and idempotency claims in Redis (``store``), the settings both
processes read (``settings``), when a job counts as lost (``reaper.reap_once``), and the names the two
processes agree on: the Celery task and queue that carry a job id, and the artifacts a job leaves
(``queue``), and the credential that lets a worker on another host move one job's files through the API
(``credentials``). Nothing here knows about HTTP or runs Celery; ``service`` and ``worker`` import from here and
never from each other.
"""
