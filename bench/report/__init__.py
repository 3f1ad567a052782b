"""The leaderboard: run records -> statistics, tables and plots (``tda-bench-leaderboard``)."""
