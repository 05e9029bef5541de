from services.processor.main import main

raise SystemExit(main())
