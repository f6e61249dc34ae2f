"""Data-free peers of KegNet, re-implemented from their papers for ``python -m bench peers`` (issue 21).

Each method gets the same teacher, the same factorized student (the suite entry's compression plan) and
the same wall time as the KegNet default run of that entry; only the way samples are made differs. These
are re-implementations, not the authors' code: ``dafl`` (Chen et al. 2019), ``deepinversion`` (Yin et
al. 2020) and ``fast-dfkd`` (Fang et al. 2022). bench/peers/run.py is the driver; common.py holds what the
methods share.
"""
