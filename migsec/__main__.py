"""``python -m migsec``: the same as the ``migsec`` command."""
from migsec.cli import main

main(prog_name="migsec")
