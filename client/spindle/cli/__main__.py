"""``python -m spindle.cli``: the same as the ``spindle`` command."""

from spindle.cli import main

raise SystemExit(main())
