from metarec_dist.cli import main

raise SystemExit(main())
