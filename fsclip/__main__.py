from fsclip.cli import main

raise SystemExit(main())
