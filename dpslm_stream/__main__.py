from dpslm_stream.cli import main

raise SystemExit(main())
