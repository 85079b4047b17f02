from vpref.cli import main

raise SystemExit(main())
