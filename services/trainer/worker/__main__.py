from services.trainer.worker.run import main

raise SystemExit(main())
