"""Allow ``python -m fedseg``."""

from fedseg.cli import main

raise SystemExit(main())
