"""io stage, on the command line: ``python -m depprune.cli ...`` runs :func:`depprune.cli.main`."""

from depprune.cli.app import main

if __name__ == "__main__":
    raise SystemExit(main())
