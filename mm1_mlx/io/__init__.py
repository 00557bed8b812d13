"""Reading and writing safely: atomic, locked output directories (``atomic``), checked JSON and
config values (``validate``), and evaluating loaded weights with progress (``materialize``)."""
