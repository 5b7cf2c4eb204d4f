from dni_async.cli import main

raise SystemExit(main())
