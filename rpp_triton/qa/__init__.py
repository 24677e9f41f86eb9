"""Extractive question answering (SQuAD v1.1 and v2.0): the official metric (`metric`), data
(`data`), windows and post-processing without torch (`features`, which the server shares) and
scoring a model (`evaluate`)."""
