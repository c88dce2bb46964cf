"""``python -m sglrun``: the same as the ``sglrun`` command."""

from sglrun.cli.entry import main

if __name__ == "__main__":
    main()
