"""``python -m prunekit`` runs the command line."""

from prunekit.cli import main

raise SystemExit(main())
