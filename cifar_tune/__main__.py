from cifar_tune.cli import main

raise SystemExit(main())
