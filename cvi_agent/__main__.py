from cvi_agent.cli import main

raise SystemExit(main())
