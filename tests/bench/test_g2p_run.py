"""Smoke test of the G2P benchmark runner (bench/g2p/run.py) on a tiny untrained teacher and a made-up
dictionary: every row runs through the real pipeline, the table and the JSON say what they should."""

from __future__ import annotations

import json
import string

import pytest
import torch

from bench.g2p.data import PHONEMES, load_g2p
from bench.g2p.run import ROWS, main, report, run_g2p
from bench.g2p.teacher import build_model, cache_path, g2p_teacher, lm_loss

ROW_KEYS = {"row", "seed", "parameters", "ratio", "greedy_word_accuracy", "greedy_per", "beam5_word_accuracy",
            "beam5_per", "speed", "score_seconds"}
PIPELINE_KEYS = {"timings_s", "pipeline_seconds", "speedup_batch1", "speedup_batched", "agreement",
                 "exact_agreement", "objective", "ranks"}


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(1)
    text = []
    for i in range(80):
        # unique a-z words: a base-26 counter, padded to 3 letters
        word = "".join(string.ascii_lowercase[(i // 26 ** k) % 26] for k in range(3))
        phones = [PHONEMES[int(p)] + "1" for p in torch.randint(len(PHONEMES), (1 + i % 4,), generator=gen)]
        text.append(f"{word} " + " ".join(phones))
    return load_g2p(text="\n".join(text))


@pytest.fixture(scope="module")
def result(data, tmp_path_factory):
    torch.manual_seed(0)
    teacher = build_model({"n_layers": 1, "n_heads": 2, "d_model": 32}, data.seq_len).eval()
    settings = {"test_words": 5, "samples": 64, "beam_size": 2, "steps": 2, "eval_every": 1, "holdout": 16,
                "target_ratio": 2.0, "speed_words": 2, "speed_batch": 4, "repeats": 1}
    return run_g2p(seeds=1, rows=ROWS, settings=settings, teacher=teacher, teacher_info={"parameters": 1},
                   data=data, work_dir=tmp_path_factory.mktemp("g2p"))


def test_rows_and_json_keys(result):
    assert [r["row"] for r in result["rows"]] == list(ROWS)
    assert result["test_words"] == 5 and result["test_subset"].startswith("5 of the")
    for row in result["rows"]:
        assert set(row) >= ROW_KEYS, row["row"]
        assert 0.0 <= row["greedy_word_accuracy"] <= 1.0 and row["greedy_per"] >= 0.0
        assert {"batch1_words_per_s", "batched_words_per_s"} <= set(row["speed"])
        if row["row"] != "teacher":
            assert set(row) >= PIPELINE_KEYS, row["row"]
            assert list(row["timings_s"]) == ["load", "compress", "sample", "finetune", "export"]
            assert 0.0 <= row["agreement"]["final"] <= 1.0 and 0.0 <= row["exact_agreement"]["final"] <= 1.0
            assert row["ratio"] > 1.5 and row["parameters"] < result["rows"][0]["parameters"]
    svd = next(r for r in result["rows"] if r["row"] == "svd")
    assert svd["distill"] is None  # steps 0: no fine-tuning
    assert set(result["summary"]) == set(ROWS)
    json.dumps(result)  # JSON-ready


def test_table_and_report_flag(result, tmp_path, capsys):
    table = report(result)
    body = table.splitlines()
    assert "5 of the" in body[0]
    names = [line.split()[0] for line in body[3:3 + len(ROWS)]]
    assert names == list(ROWS)
    out = tmp_path / "g2p.json"
    out.write_text(json.dumps(result))
    main(["--report", "--out", str(out)])
    assert capsys.readouterr().out.strip() == table


def test_lm_loss_ignores_padding(data):
    model = build_model({"n_layers": 1, "n_heads": 2, "d_model": 16}, data.seq_len)
    batch = data.sequences["train"][:4]
    loss = lm_loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(69.0))), rel=0.1)  # untrained: near uniform


def test_unknown_row_refused(data):
    with pytest.raises(ValueError, match="unknown rows"):
        run_g2p(rows=["teacher", "nope"], teacher=build_model({"n_layers": 1, "n_heads": 1, "d_model": 8}),
                data=data)


def test_teachers_have_their_own_cache_files():
    assert cache_path(0).name == "g2p-transformer-seed0.safetensors"  # the main teacher's file, as committed
    assert cache_path(0, "small").name == "g2p-transformer-small-seed0.safetensors"
    with pytest.raises(ValueError, match="unknown teacher 'nope'; choose from base, small"):
        g2p_teacher(0, name="nope")


def test_a_shallower_student_row(data, tmp_path):
    torch.manual_seed(0)
    teacher = build_model({"n_layers": 2, "n_heads": 2, "d_model": 32}, data.seq_len).eval()
    settings = {"test_words": 3, "samples": 64, "steps": 1, "eval_every": 1, "holdout": 16, "target_ratio": 1.5,
                "speed_words": 1, "speed_batch": 4, "repeats": 1, "student_layers": 1}
    out = run_g2p(seeds=1, rows=["word"], settings=settings, teacher=teacher, teacher_info={}, data=data,
                  work_dir=tmp_path)
    assert out["rows"][0]["blocks"] == {"kept": [0], "of": 2}
    assert "student blocks 1" in report(out)
