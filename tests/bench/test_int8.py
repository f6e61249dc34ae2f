"""bench.int8's report of what the job itself kept, on saved results (no job is run)."""

import json
from pathlib import Path

from bench.int8 import job_choice

RESULTS = Path(__file__).parents[2] / "bench" / "results" / "issue22"


def _result(name: str) -> dict:
    return json.loads((RESULTS / f"s22-int8-keep-{name}-s0.json").read_text())


def test_the_jobs_choice_is_named_with_its_candidates_real_accuracy() -> None:
    result = _result("mnist-lcnet")
    # The row's own choice skipped the job's check, which refused Entropy (docs/benchmarks.md, ninth session).
    assert result["rows"]["int8"]["method"] == "entropy"
    assert job_choice(result) == ("the job's int8 choice: percentile, 94.28 % (+0.35 against fp32); "
                                  "kept student.int8.onnx")
    assert job_choice(_result("fashion-mobilenetv3")) == (
        "the job's int8 choice: equalized minmax, 67.69 % (-2.51 against fp32); kept student.int8.onnx")


def test_a_job_that_kept_no_file_says_why_and_no_job_says_nothing() -> None:
    result = _result("fashion-mobilenetv3")
    result["job_int8"] |= {"kept": False, "reason": "it ran slower than the fp32 model at batch 1"}
    result["job_int8"]["calibration"]["equalization"]["kept"] = False
    assert job_choice(result) == ("the job's int8 choice: minmax, 67.95 % (-2.25 against fp32); kept no int8 file "
                                  "(it ran slower than the fp32 model at batch 1)")
    del result["job_int8"]
    assert job_choice(result) is None
