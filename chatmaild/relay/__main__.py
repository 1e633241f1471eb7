"""python -m chatmaild.relay: run a complete local relay (same as ``chatmaild dev``)."""

from chatmaild.relay.cli import main

raise SystemExit(main())
