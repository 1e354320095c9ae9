from mixllm.cli import main

raise SystemExit(main())
