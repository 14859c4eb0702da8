from diffrig.cli import main

raise SystemExit(main())
