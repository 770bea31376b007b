from insitu_daq.app.cli import main

raise SystemExit(main())
