from spotrun.control.durable.run import main

raise SystemExit(main())
