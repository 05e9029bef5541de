from services.publisher.main import main

raise SystemExit(main())
