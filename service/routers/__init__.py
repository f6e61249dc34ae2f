"""One router per resource: jobs, artifacts, health."""
