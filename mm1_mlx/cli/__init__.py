"""What every command line shares: argparse with one-line errors and mlx-lm's flag names
(``args``), and Ctrl-C / SIGTERM handling (``signals``)."""
