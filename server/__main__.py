"""`python -m dpslm_stream.server [options]`: the same as `dpslm-stream serve`."""

from .cli import main

raise SystemExit(main())
