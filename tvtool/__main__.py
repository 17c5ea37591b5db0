"""``python -m tvtool`` entry point."""

from tvtool.cli.app import main

if __name__ == "__main__":
    main()
