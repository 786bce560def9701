"""Leaderboard: submission schema, validation, re-scoring and the results page."""
