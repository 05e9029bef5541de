from services.encode.main import main

raise SystemExit(main())
