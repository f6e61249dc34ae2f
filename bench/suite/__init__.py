"""The robustness suite: many teachers trained here on real data, one table of sample recipes (issue 11).

``tasks`` reads the real data (and builds the harder variants from it), ``teachers`` trains and caches one
teacher per task, ``run`` compresses each with every sample recipe and scores the students on real test data.
"""
