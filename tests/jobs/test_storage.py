"""Local file storage: only server-made names become paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.storage import LocalStorage


def test_storage_rejects_bad_job_ids(settings):
    storage = LocalStorage(Path(settings.data_dir))
    for bad in ["..", "../x", "a" * 31, "A" * 32]:
        with pytest.raises(ValueError):
            storage.job_dir(bad)
