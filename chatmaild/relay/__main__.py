"""python -m chatmaild.relay: run a complete local relay (same as ``chatmaild dev``)."""

from .cli import main

raise SystemExit(main())
