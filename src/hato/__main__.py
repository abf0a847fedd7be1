"""``python -m hato``: the same as the ``hato`` command."""

from hato.cli import main

main()
